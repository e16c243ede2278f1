"""Loading an experiment YAML: parse, fill the defaults from OPTIONS, check every key, resolve paths."""

from __future__ import annotations

import argparse
import copy
import difflib
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from parallel_optuna.options import NAME, OPTIONS, SAFE_NAME, SECTION_KEYS, ConfigError, flag_overrides
from parallel_optuna.run_dir import run_dir
from parallel_optuna.search_space import check_search_space

if TYPE_CHECKING:  # for the hints only: loading a config needs no optuna
    import optuna


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 numbers: 1e-4 is a float, 2:30:00 stays a (SLURM) string.

    A key written twice in one mapping is an error: PyYAML would keep the last one silently.
    """

    def compose_mapping_node(self, anchor):
        node = super().compose_mapping_node(anchor)  # as written: merge keys (<<) not yet expanded
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if (key.tag, key.value) in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key.value!r} twice", key.start_mark)
                seen.add((key.tag, key.value))
        return node


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if not tag.endswith((":int", ":float"))]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?(0|[1-9][0-9]*)$"), list("-+0123456789"))
YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(\.[0-9]+|[0-9]+\.[0-9]*)([eE][-+]?[0-9]+)?$|^[-+]?[0-9]+[eE][-+]?[0-9]+$|^[-+]?\.(inf|Inf|INF)$|^\.(nan|NaN|NAN)$"
    ),
    list("-+0123456789."),
)


def read_yaml(text):
    return yaml.load(text, Loader=YamlLoader)


def experiment_yaml(exp_id: str | None = None, config: str | None = None, experiments_dir: str = "experiments") -> Path:
    """The YAML file named by --config, or experiments/<exp_id>/config.yaml for --exp_id."""
    if config:
        return Path(config)
    if not SAFE_NAME.match(exp_id or ""):
        raise ConfigError("--exp_id", "exp_id", f"{exp_id!r} is not a valid experiment id", NAME)
    return Path(experiments_dir) / exp_id / "config.yaml"


class Config(dict):
    """The experiment's settings: the YAML as a dict, with defaults filled in and paths made absolute.

    Where they came from is the tool's business and rides beside the settings, never inside them,
    so a trainer, a trial's config.yaml and an export see only the user's keys (pass dict(config)
    where a plain dict is needed, as yaml.safe_dump does):
      path       the YAML file, absolute
      dir        its folder: relative paths and the user's modules are found from here
      overrides  the command line's values (those given)
      in_yaml    the YAML's own values of the keys the overrides replaced
      defaulted  the study/slurm keys the YAML left out, filled with their defaults
      version    the config_versions version it is, once known
    """

    def __init__(self, settings: dict, path: str | Path, overrides: dict | None = None) -> None:
        super().__init__(settings)
        self.path = str(Path(path).resolve())
        self.dir = str(Path(self.path).parent)
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.in_yaml = {}
        self.defaulted = set()
        self.version = None


def load_config(path: str | Path, overrides: dict | None = None, text: str | None = None) -> Config:
    """Read and validate the experiment YAML, fresh from disk (or `text`, a saved version of it), with CLI overrides.

    Returns the whole config (a Config) with `study` and `slurm` filled with defaults and paths made
    absolute. Raises ConfigError for anything that would fail later.
    """
    source = str(path)
    config = Config(parse_yaml(read_text(path) if text is None else text, source), path, overrides)
    if "pareto_front" in config:  # what make best writes for several objectives: one YAML per member retrains
        raise ConfigError(
            source,
            "pareto_front",
            "is an export of several trials, not one experiment",
            "export one member (make best ARGS='--trial N'), then python worker.py --config trial_N.yaml",
        )
    _check_section_names(config, source)
    _fill_sections(config, config.overrides, source)
    _resolve_paths(config, Path(config.dir), source)
    _check_objectives(config, source)
    check_search_space(config, source)
    _check_slurm(config, source)
    return config


def read_text(path):
    try:
        return Path(path).read_text()
    except OSError as e:
        raise ConfigError(str(path), "(file)", f"cannot read it ({e.strerror})", "pass an existing YAML file") from None


def parse_yaml(text, source):
    """The YAML's top-level mapping, as the user wrote it."""
    try:
        config = read_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(syntax)"
        problem = str(getattr(e, "problem", None) or e).replace("\n", " ")
        raise ConfigError(source, where, f"invalid YAML ({problem})", "correct the YAML syntax at that line") from None
    if not isinstance(config, dict):
        raise ConfigError(
            source, "(top level)", "is not a mapping", "write 'key: value' pairs, see config.example.yaml"
        )
    return config


def _check_section_names(config, source):
    """A misspelled study:, slurm: or search_space: would be ignored silently: its defaults, or no search space."""
    missing = [section for section in ("study", "slurm", "search_space") if section not in config]
    for key in config:
        near = difflib.get_close_matches(str(key), missing, n=1, cutoff=0.8)
        if near:
            raise ConfigError(source, str(key), f"unknown section; did you mean {near[0]}?", f"rename it to {near[0]}")


def _fill_sections(config, overrides, source):
    """study: and slurm: with the overrides applied, defaults filled in and every value checked."""
    for section, known in SECTION_KEYS.items():
        values = config.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(source, section, "is not a mapping", f"write '{section}:' followed by indented keys")
        unknown = sorted(set(values) - known)
        if unknown:
            near = difflib.get_close_matches(str(unknown[0]), known, n=1, cutoff=0.7)
            fix = f"did you mean {near[0]}?" if near else f"use one of {', '.join(sorted(known))}"
            raise ConfigError(source, f"{section}.{unknown[0]}", "unknown key", fix)
        config[section] = values
    for option in OPTIONS:
        _fill_option(config, option, overrides, source)


def _fill_option(config, option, overrides, source):
    """One option's value: the YAML's, else its default; the flag's where given; then checked."""
    values, key = config[option.section], f"{option.section}.{option.key}"
    if option.key not in values:
        if overrides.get(option.key) is None:
            config.defaulted.add(option.key)
        values[option.key] = copy.deepcopy(option.default)
    elif values[option.key] is None and not may_be_empty(option):
        raise ConfigError(
            source, key, "has no value", f"give it one ({option.help}) or delete the line for the default"
        )
    if overrides.get(option.key) is not None:
        config.in_yaml[option.key] = values[option.key]
        values[option.key] = overrides[option.key]
    value = values[option.key]
    if option.key in ("walltime", "mem_per_cpu") and isinstance(value, int) and not isinstance(value, bool):
        value = values[option.key] = str(value)  # 30 = 30 minutes, 4096 = 4096 MB
    if option.key in ("optimization_metric", "optimization_direction") and "," in (value or ""):
        value = values[option.key] = value.split(",")  # --optimization_direction min...,max...
    if value is not None and option.check(value):
        _bad_option(option, value, f"--{option.key}" if overrides.get(option.key) is not None else source)


def may_be_empty(option):
    """Whether `key:` with no value means something: off, the default, or no #SBATCH line (the cluster's default).

    Not the walltime: the walltime signal is timed from it.
    """
    cluster_default = option.sbatch and option.key != "walltime" or option.key == "gpus_per_task"
    return option.default is None or option.default is False or cluster_default


def _bad_option(option, value, source):
    key = f"{option.section}.{option.key}"
    flag = "" if isinstance(option.default, (dict, list)) else f" or --{option.key}"
    raise ConfigError(source, key, f"{value!r} {option.check(value)}", f"correct {key} ({option.help}){flag}")


def _resolve_paths(config, base, source):
    """The default study name, and paths relative to the YAML made absolute."""
    study = config["study"]
    if not study["study_name"]:
        if not SAFE_NAME.match(base.name):
            raise ConfigError(source, "study.study_name", f"the folder name {base.name!r} is no study name", NAME)
        study["study_name"] = base.name
    study["runs_dir"] = str(base / os.path.expandvars(os.path.expanduser(study["runs_dir"])))
    if re.search(r"[\s%'\"\\]", str(run_dir(config))):  # it lands in #SBATCH --output, unquoted
        raise ConfigError(
            source,
            "study.runs_dir",
            f"{str(run_dir(config))!r} contains spaces, quotes or '%'",
            "choose a runs_dir (and folder) without them: SLURM log paths cannot hold them",
        )
    storage = study["storage"] or ""
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////") and "storage" not in config.overrides:
        study["storage"] = f"sqlite:///{base / study['storage'][len('sqlite:///') :]}"  # relative to the YAML
    data = config.get("data")
    if isinstance(data, dict) and isinstance(data.get("dir"), str):
        data["dir"] = str(base / os.path.expandvars(os.path.expanduser(data["dir"])))


def metric_names(config: Config, study: optuna.Study | None = None) -> list[str]:
    """The study's metrics, one per objective.

    A plain objective whose YAML names none gets the names it gave with `study.set_metric_names`
    (Optuna's `study.metric_names`, which the dashboard shows too), else the names Optuna shows:
    `value`, or `values_0`, `values_1`, ...
    """
    settings = config["study"]
    if settings["objective"] and "optimization_metric" in getattr(config, "defaulted", ()):
        count = len(directions(config))
        named = study.metric_names if study is not None else None
        if named and len(named) == count:
            return list(named)
        return ["value"] if count == 1 else [f"values_{i}" for i in range(count)]
    metric = settings["optimization_metric"]
    return metric if isinstance(metric, list) else [metric]


def directions(config: Config) -> list[str]:
    direction = config["study"]["optimization_direction"]
    return direction if isinstance(direction, list) else [direction]


def _check_objectives(config, source):
    """The user's code is named; one metric per direction; several objectives (Pareto front) cannot be pruned."""
    study = config["study"]
    if not study["trainer"] and not study["objective"]:
        raise ConfigError(
            source,
            "study.trainer",
            "names no code to run (nor does study.objective)",
            "name your trainer as study.trainer: module:function, or a plain Optuna objective as study.objective "
            "(config.example.yaml names the example's, examples.ishigami_lstm:train)",
        )
    if len(metric_names(config)) != len(directions(config)):
        raise ConfigError(
            source,
            "study.optimization_direction",
            f"{len(directions(config))} direction(s) for {len(metric_names(config))} metric(s)",
            "give one direction per optimization_metric",
        )
    pruner = (study["pruner"] or {}).get("name")
    if len(directions(config)) > 1 and pruner not in (None, "NopPruner"):
        raise ConfigError(
            source,
            "study.pruner",
            f"{pruner} cannot prune a study with several objectives (Optuna reports one value per step)",
            "remove study.pruner",
        )


def _check_slurm(config, source):
    study = config["study"]
    if study["grace_period"] < 2 * study["heartbeat_interval"]:  # optuna#4234: live trials failed
        raise ConfigError(
            source,
            "study.grace_period",
            f"{study['grace_period']} s is too close to the heartbeat",
            "make grace_period at least twice heartbeat_interval",
        )
    slurm = config["slurm"]
    if slurm["nodes_per_trial"] > slurm["tasks_per_trial"]:
        raise ConfigError(
            source,
            "slurm.nodes_per_trial",
            f"{slurm['nodes_per_trial']} nodes for {slurm['tasks_per_trial']} processes (slurm.tasks_per_trial)",
            "ask for at most one node per process",
        )
    if walltime_seconds(slurm["walltime"]) <= slurm["signal_grace"] + SLURM_LIMIT_CHECK_S:
        flags = [f"--{key}" for key in ("signal_grace", "walltime") if key in config.overrides]
        raise ConfigError(
            " and ".join(flags) or source,
            "slurm.signal_grace",
            f"{slurm['signal_grace']} s leaves {SLURM_LIMIT_CHECK_S} s or less of the walltime "
            f"({slurm['walltime']}): SLURM may send the walltime signal as a task starts, which kills it",
            f"make signal_grace at most the walltime less {SLURM_LIMIT_CHECK_S + 1} s, or raise the walltime",
        )


# SLURM checks time limits every 30 s and sends the walltime signal once the end is within signal_grace + 30 s:
# with no more of the walltime left than that, at its first check, which can come before the task's shell has
# set its trap (measured: signal_grace 30 of a minute, USR2 at 14.5 s; 10 of a minute, at 44.6 s).
SLURM_LIMIT_CHECK_S = 30


def walltime_seconds(text: str) -> int:
    """SLURM's time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))  # D-HH[:MM[:SS]]
        hours, minutes, seconds = parts
        return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)


def config_from_args(args: argparse.Namespace) -> Config:
    """The experiment YAML that --config/--exp_id name, fresh from disk, with the given flags applied."""
    return load_config(yaml_from_args(args), flag_overrides(args))


def yaml_from_args(args: argparse.Namespace) -> Path:
    return experiment_yaml(args.exp_id, args.config, args.experiments_dir)
