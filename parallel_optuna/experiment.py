"""What submit_study.py and worker.py share: the experiment YAML and the Optuna study.

An experiment YAML holds three kinds of keys:
  study:        how the study runs (name, budget, metric, sampler, pruner, storage, retries)
  slurm:        how each array task is scheduled (walltime, GPU, memory, ...)
  search_space: dotted paths into the config and how to sample them
Everything else (data, model, training, ...) is the trainer's own config, handed to it resolved.

Every study/slurm option is declared once in OPTIONS below: the YAML key, the argparse flag of
the same name, its check, and the #SBATCH line it renders to all come from that one table.
"""

import argparse
import copy
import difflib
import errno
import importlib
import inspect
import os
import pwd
import re
import shlex
import socket
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from parallel_optuna import samplers
from parallel_optuna.storage import journal

# Heartbeats and fail_stale_trials are marked experimental; they are what Optuna offers for dead workers.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
WALLTIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
MEMORY = re.compile(r"^\d+[KMGTkmgt]?$")
SLURM_LIST = re.compile(r"^[A-Za-z0-9_.,-]+$")
CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,|&*:\[\]()-]+$")
EMAIL = re.compile(r"^[A-Za-z0-9_.+-]+@[A-Za-z0-9.-]+$")
DIRECTIVE = re.compile(r"^--[a-z][a-z0-9-]*(=[A-Za-z0-9_.,:@%/+=-]+)?$")
DEFAULT_TRAINER = "ishigami_lstm:train"
# What the array file itself decides: a directive in the YAML must not change or bypass it.
OWN_DIRECTIVES = {"--wrap", "--array", "--output", "--error", "--open-mode", "--signal", "--requeue", "--ntasks"}


class ConfigError(Exception):
    """A bad input: rendered as one line naming the file, the key and the fix; exit status 2."""

    def __init__(self, source, key, problem, fix):
        super().__init__(f"{source}: {key}: {problem}; fix: {fix}")


class CommandLine(argparse.ArgumentParser):
    """argparse with the tool's errors: one line naming the flag and the fix, exit status 2; no abbreviations."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)  # --max_concurrent must not quietly mean another flag

    def error(self, message):
        fix = "see --help"
        flags = [o for a in self._actions for o in a.option_strings if o.startswith("--")]
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        near = unknown and difflib.get_close_matches(unknown.group(1).split("=")[0], flags, n=1, cutoff=0.7)
        if near:
            fix = f"did you mean {near[0]}? (see --help)"
        self.exit(2, f"error: {self.prog}: {message}; fix: {fix}\n")


# ---------------------------------------------------------------- option checks
def _int_at_least(low):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"must be an integer >= {low}"

    return check


def _int_between(low, high):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            return f"must be an integer from {low} to {high}"

    return check


def _matches(pattern, what):
    def check(value):
        if not isinstance(value, str) or not pattern.match(value):
            return f"must be {what}"

    return check


def _one_of(*choices):
    def check(value):
        if value not in choices:
            return f"must be one of {', '.join(choices)}"

    return check


def _one_or_list(check):
    def check_each(value):
        values = value if isinstance(value, list) else [value]
        if not values:
            return "must not be an empty list"
        return next((problem for problem in map(check, values) if problem), None)

    return check_each


def _mapping_with_name(value):
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return "must be a mapping with a 'name' (an Optuna class) and its options"


def _sampler(value):
    if not isinstance(value, dict) or not isinstance(value.get("name", ""), str):
        return "must be a mapping: {seed: 0} for the default, or {name: <Optuna sampler>, options}"


def _directives(value):
    if not isinstance(value, list) or not all(isinstance(v, str) and DIRECTIVE.match(v) for v in value):
        return "must be a list of '--option[=value]' strings of safe characters"
    ours = [v for v in value if v.split("=")[0] in OWN_DIRECTIVES]
    if ours:
        return f"sets {ours[0].split('=')[0]}, which submit_study.py controls"


def _bool(value):
    if not isinstance(value, bool):
        return "must be true or false"


def _text(value):
    if not isinstance(value, str) or not value or "\n" in value:
        return "must be a one-line string"


def _setup_lines(value):
    if not isinstance(value, list) or not all(isinstance(v, str) and "\n" not in v for v in value):
        return "must be a list of one-line shell commands"


@dataclass(frozen=True)
class Option:
    section: str
    key: str
    default: object
    check: object
    help: str
    sbatch: str = ""  # "#SBATCH" template, when the option maps to one directly


NAME = "letters, digits, '.', '_' or '-' (no spaces, no '/')"
OPTIONS = [
    Option("study", "study_name", None, _matches(SAFE_NAME, NAME), "study name (default: the YAML's folder name)"),
    Option("study", "n_trials", 20, _int_at_least(1), "finished trials (COMPLETE+PRUNED) the whole study aims for"),
    Option(
        "study",
        "optimization_metric",
        "val_mae_mean",
        _one_or_list(_matches(SAFE_NAME, "a metric name")),
        "metric returned by the trainer that Optuna optimizes (a list, or a,b, for several objectives)",
    ),
    Option(
        "study",
        "optimization_direction",
        "minimize",
        _one_or_list(_one_of("minimize", "maximize")),
        "minimize or maximize (a list, or minimize,maximize, for several objectives)",
    ),
    Option("study", "storage", None, _text, "Optuna storage URL (default: journal file in the run directory)"),
    Option("study", "sampler", {}, _sampler, "sampler: {seed: 0} (the default) or {name: ..., options}"),
    Option(
        "study",
        "pruner",
        None,
        _mapping_with_name,
        "pruner: {name: ..., options} (default: MedianPruner; none with several objectives)",
    ),
    Option("study", "enqueue_base", False, _bool, "measure the YAML's own values of the searched keys first"),
    Option("study", "allow_repeats", False, _bool, "train a config again when the sampler repeats it (noisy)"),
    Option(
        "study",
        "trusted_checkpoints",
        False,
        _bool,
        "load checkpoints as full pickles (torch weights_only=False): only for state beyond tensors and plain data",
    ),
    Option("study", "max_retries", 2, _int_at_least(0), "retries of a trial whose worker died"),
    Option("study", "max_requeues", 5, _int_at_least(0), "walltime/preemption requeues of one trial"),
    Option(
        "study", "keep_best", 3, _int_at_least(1), "COMPLETE trials whose weights are kept (other checkpoints: deleted)"
    ),
    Option(
        "study", "heartbeat_interval", 60, _int_at_least(1), "seconds between heartbeats (SQLite/PostgreSQL storages)"
    ),
    Option("study", "grace_period", 300, _int_at_least(1), "seconds without heartbeat before a trial counts as dead"),
    Option("study", "runs_dir", "runs", _text, "where runs/<study>/ lives (relative to the YAML)"),
    Option(
        "study",
        "trainer",
        DEFAULT_TRAINER,
        _matches(re.compile(r"^[\w.]+:\w+$"), "package.module:function"),
        "trainer function, package.module:function",
    ),
    Option(
        "study",
        "objective",
        None,
        _matches(re.compile(r"^[\w.]+:\w+$"), "package.module:function"),
        "a plain Optuna objective(trial), package.module:function; replaces trainer and search_space",
    ),
    Option("slurm", "max_concurrent_jobs", 4, _int_at_least(1), "array tasks running at once (%K)"),
    Option(
        "slurm",
        "walltime",
        "1-00:00:00",
        _matches(WALLTIME, "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
        "time per array task",
        "--time={}",
    ),
    Option("slurm", "gpu_type", None, _matches(SAFE_NAME, "a GPU type such as rtx_4090"), "GPU type (none: any GPU)"),
    Option("slurm", "gpus_per_task", 1, _int_at_least(0), "GPUs per array task (0 = CPU-only tasks)"),
    Option("slurm", "cpus_per_task", 1, _int_at_least(1), "CPUs per array task", "--cpus-per-task={}"),
    Option(
        "slurm", "mem_per_cpu", "4G", _matches(MEMORY, "<int>[K|M|G|T], e.g. 23G"), "memory per CPU", "--mem-per-cpu={}"
    ),
    Option("slurm", "partition", None, _matches(SLURM_LIST, "partition names"), "partition", "--partition={}"),
    Option("slurm", "account", None, _matches(SAFE_NAME, "an account name"), "account", "--account={}"),
    Option("slurm", "qos", None, _matches(SAFE_NAME, "a QOS name"), "quality of service", "--qos={}"),
    Option(
        "slurm",
        "constraint",
        None,
        _matches(CONSTRAINT, "a node feature expression"),
        "node features",
        "--constraint={}",
    ),
    Option(
        "slurm", "signal_grace", 120, _int_between(1, 65535), "seconds before the walltime to checkpoint and requeue"
    ),
    Option(
        "slurm",
        "extra_directives",
        [],
        _directives,
        "more #SBATCH directives, e.g. --mail-type=END",
    ),
    Option("slurm", "setup", [], _setup_lines, "shell lines run before the worker (module load ..., source ...)"),
    Option("slurm", "scratch", None, _text, "where --cluster stages the data (default: $SCRATCH)"),
    Option("slurm", "notify_on_finish", False, _bool, "once every task has ended, a small job exports the best trial"),
    Option("slurm", "mail_user", None, _matches(EMAIL, "an e-mail address"), "mail the end of that job here"),
]
SECTION_KEYS = {s: {o.key for o in OPTIONS if o.section == s} for s in ("study", "slurm")}


def add_experiment_flags(parser, sections):
    """--config or --exp_id, and one flag per scalar option of the sections, named as its YAML key."""
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--config", help="experiment YAML")
    which.add_argument("--exp_id", help="experiment id: experiments/<exp_id>/config.yaml")
    parser.add_argument("--experiments_dir", default="experiments", help="where --exp_id looks")
    for option in OPTIONS:
        if option.section in sections and not isinstance(option.default, (dict, list, bool)):
            kind = int if isinstance(option.default, int) else str
            parser.add_argument(
                f"--{option.key}", type=kind, help=f"{option.help} [{option.section}.{option.key}]".replace("%", "%%")
            )


def config_from_args(args):
    """The experiment YAML that --config/--exp_id name, fresh from disk, with the given flags applied."""
    return load_config(yaml_from_args(args), flag_overrides(args))


def yaml_from_args(args):
    return experiment_yaml(args.exp_id, args.config, args.experiments_dir)


def flag_overrides(args):
    """The study/slurm options given as flags."""
    return {o.key: getattr(args, o.key, None) for o in OPTIONS if getattr(args, o.key, None) is not None}


# ---------------------------------------------------------------- loading the YAML
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


def experiment_yaml(exp_id=None, config=None, experiments_dir="experiments"):
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

    def __init__(self, settings, path, overrides=None):
        super().__init__(settings)
        self.path = str(Path(path).resolve())
        self.dir = str(Path(self.path).parent)
        self.overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        self.in_yaml = {}
        self.defaulted = set()
        self.version = None


def load_config(path, overrides=None, text=None):
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
    _check_search_space(config, source)
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


def metric_names(config):
    """The study's metrics, one per objective."""
    metric = config["study"]["optimization_metric"]
    return metric if isinstance(metric, list) else [metric]


def directions(config):
    direction = config["study"]["optimization_direction"]
    return direction if isinstance(direction, list) else [direction]


def _check_objectives(config, source):
    """One metric per direction; several objectives (Pareto front) cannot be pruned."""
    study = config["study"]
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
    if walltime_seconds(slurm["walltime"]) <= slurm["signal_grace"]:
        flags = [f"--{key}" for key in ("signal_grace", "walltime") if key in config.overrides]
        raise ConfigError(
            " and ".join(flags) or source,
            "slurm.signal_grace",
            f"{slurm['signal_grace']} s is not shorter than the walltime",
            "make signal_grace smaller than walltime",
        )


def walltime_seconds(text):
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


# ---------------------------------------------------------------- search space
def _check_search_space(config, source):
    space = config.get("search_space") or {}
    if not isinstance(space, dict):
        raise ConfigError(source, "search_space", "is not a mapping", "map dotted config paths to {type: ...} specs")
    for name, spec in space.items():
        key = f"search_space.{name}"
        if not isinstance(name, str):
            raise ConfigError(source, key, "is not a dotted path", f"name a key of the config ({_sections(config)})")
        try:
            get_dotted(config, name)
        except KeyError:
            raise ConfigError(
                source,
                key,
                f"'{name}' is not a key of the config",
                f"name an existing dotted path ({_sections(config)})",
            ) from None
        if not isinstance(spec, dict):
            raise ConfigError(source, key, "is not a mapping", "write {type: int|float|categorical, ...}")
        kind = spec.get("type")
        allowed = {
            "int": {"type", "low", "high", "step", "log"},
            "float": {"type", "low", "high", "step", "log"},
            "categorical": {"type", "choices"},
        }
        if kind not in allowed:
            raise ConfigError(source, f"{key}.type", f"unknown type {kind!r}", "use int, float or categorical")
        extra = sorted(set(spec) - allowed[kind])
        if extra:
            raise ConfigError(
                source, f"{key}.{extra[0]}", f"not an option of type {kind}", f"use {', '.join(sorted(allowed[kind]))}"
            )
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(source, f"{key}.choices", "must be a non-empty list", "write choices: [a, b, c]")
            continue
        _check_range(spec, key, source, int if kind == "int" else float)


def type_mismatches(config):
    """Searched keys whose YAML value is an int (not 0) sampled as floats: a trainer using it as a count fails."""
    return [
        f"search_space.{name} samples floats, but the YAML's {name} is the int {value}; type: int if it counts"
        for name, spec in sampled_space(config).items()
        if spec.get("type") == "float" and type(value := get_dotted(config, name)) is int and value != 0
    ]


def _sections(config):
    ours = {"study", "slurm", "search_space"}
    return "sections: " + ", ".join(k for k in config if k not in ours)


def _check_range(spec, key, source, number):
    kinds = (int,) if number is int else (int, float)
    for bound in ("low", "high", "step"):
        value = spec.get(bound)
        if bound == "step" and value is None:
            continue
        if value is None:
            raise ConfigError(source, f"{key}.{bound}", "is missing", f"give {bound} as {number.__name__}")
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ConfigError(
                source, f"{key}.{bound}", f"{value!r} is not a number", f"give {bound} as {number.__name__}"
            )
    if spec["low"] > spec["high"]:
        raise ConfigError(source, key, f"low {spec['low']} > high {spec['high']}", "swap low and high")
    if spec.get("step") is not None and spec["step"] <= 0:
        raise ConfigError(source, f"{key}.step", f"{spec['step']} is not positive", "give a step > 0 or leave it out")
    if spec.get("log") and spec["low"] <= 0:
        raise ConfigError(source, f"{key}.low", "log scale needs low > 0", "set low > 0 or log: false")
    if spec.get("log") and spec.get("step") is not None:
        raise ConfigError(source, key, "step and log cannot be combined", "drop step or log")


def sample_params(trial, space):
    """Ask the trial for each search-space entry; the params keep their dotted names."""
    for name, spec in space.items():
        if spec["type"] == "categorical":
            trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            trial.suggest_int(name, spec["low"], spec["high"], step=spec.get("step") or 1, log=bool(spec.get("log")))
        else:
            trial.suggest_float(name, spec["low"], spec["high"], step=spec.get("step"), log=bool(spec.get("log")))
    return dict(trial.params)


def get_dotted(config, dotted):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


def resolve_config(config, params):
    """A plain-dict copy of the settings with the sampled params written in and derived dimensions recomputed."""
    resolved = copy.deepcopy(dict(config))
    for dotted, value in params.items():
        *parents, leaf = dotted.split(".")
        node = resolved
        for part in parents:
            node = node[part]
        node[leaf] = value
    update = getattr(trainer_module(config), "update_config", None)
    return (update(resolved) or resolved) if update else resolved  # in place or returned, both work


# ---------------------------------------------------------------- the user's code: a trainer or a plain objective
PROJECT = Path(__file__).resolve().parent.parent
EXAMPLE_TRAINERS = {"ishigami_lstm"}
TOOL_MODULES = {p.stem for p in [*PROJECT.glob("*.py"), *Path(__file__).parent.rglob("*.py")]} - EXAMPLE_TRAINERS


def code_key(config):
    """The study key that names the user's code: a plain Optuna objective wins over a trainer."""
    return "objective" if config["study"]["objective"] else "trainer"


def trainer_module(config, key="trainer"):
    """The module of study.trainer (or study.objective), imported by one rule for both.

    It is looked up in the experiment's folder, then in the folder the study was submitted from
    (the array file runs there), then on PYTHONPATH as it was at submit time (the array file sets it).
    """
    name = config["study"][key].partition(":")[0]
    if name.split(".")[0] in TOOL_MODULES:
        raise ConfigError(
            config.path,
            f"study.{key}",
            f"module {name.split('.')[0]!r} has the name of one of Parallel Optuna's own modules",
            f"rename your module (not one of {', '.join(sorted(TOOL_MODULES))})",
        )
    for folder in (os.getcwd(), config.dir):  # each goes first: the experiment's own code wins
        if folder and folder not in sys.path:
            sys.path.insert(0, folder)
    if str(PROJECT) not in sys.path:
        sys.path.append(str(PROJECT))  # the example trainer
    optimize = optuna.study.Study.optimize
    optuna.study.Study.optimize = _optimize_on_import  # a script's own study.optimize, not under __main__
    try:
        return importlib.import_module(name)
    finally:
        optuna.study.Study.optimize = optimize


class OptimizeOnImport(Exception):
    """The user's module runs study.optimize() when imported: every array task would run a whole study."""


def _optimize_on_import(*args, **kwargs):
    raise OptimizeOnImport


def load_trainer(config, source="config"):
    """The trainer function; its METRICS, if it declares them, must name the study's metric."""
    function, module = load_function(config, "trainer", source)
    metrics = getattr(module, "METRICS", None)
    for metric in metric_names(config):
        if metrics and metric not in metrics:
            raise ConfigError(
                source,
                "study.optimization_metric",
                f"{metric!r} is not a metric of {config['study']['trainer']}",
                f"use one of {', '.join(metrics)}",
            )
    return function


def load_objective(config, source="config"):
    """The plain Optuna objective(trial) of study.objective (or --objective)."""
    return load_function(config, "objective", source)[0]


CALLED_WITH = {"trainer": ("config", "trial"), "objective": ("trial",)}  # how the worker calls each


def load_function(config, key, source):
    """The user's function that study.<key> names, and its module: imported, and its signature checked."""
    spec = config["study"][key]
    try:
        module = trainer_module(config, key)
    except ConfigError:
        raise
    except OptimizeOnImport:
        raise ConfigError(
            source,
            f"study.{key}",
            f"importing {spec.partition(':')[0]!r} runs study.optimize()",
            "put the module's own study under if __name__ == '__main__':",
        ) from None
    except SyntaxError as e:
        where = f"{Path(e.filename or '?').name}, line {e.lineno}"
        raise ConfigError(
            source, f"study.{key}", f"cannot import {spec!r}: {e.msg} ({where})", f"correct the syntax at {where}"
        ) from None
    except Exception as e:  # ImportError, or a NameError inside the user's module
        raise ConfigError(
            source,
            f"study.{key}",
            f"cannot import {spec!r} ({type(e).__name__}: {e})",
            "name a package.module:function importable from the experiment's folder, where you submit, or PYTHONPATH",
        ) from None
    name = spec.partition(":")[2]
    if not hasattr(module, name):
        raise ConfigError(source, f"study.{key}", f"{spec!r} has no such function", "name a function of that module")
    function = getattr(module, name)
    wanted = f"def {name}({', '.join(CALLED_WITH[key])})"
    if not callable(function):
        raise ConfigError(source, f"study.{key}", f"{spec!r} is not a function", f"define {wanted}")
    try:
        inspect.signature(function).bind(*CALLED_WITH[key])
    except TypeError as e:
        raise ConfigError(
            source, f"study.{key}", f"{spec!r} cannot be called as {key} ({e})", f"define {wanted}"
        ) from None
    except ValueError:
        pass  # no signature to read (a builtin): its call will tell
    return function, module


def prepare_data(config, source="config"):
    """Let the trainer write its data once (optional `prepare(config)` in its module), then check it is there."""
    prepare = None if config["study"]["objective"] else getattr(trainer_module(config), "prepare", None)
    try:
        if prepare:
            prepare(dict(config))  # the user's settings only, as the trainer gets them
    except Exception as e:
        if isinstance(e, ConfigError) or full_filesystem(e):
            raise
        where = f"{config['study']['trainer'].partition(':')[0]}.prepare(config)"
        fix = "fix it, or the config keys it reads"
        if "trainer" in getattr(config, "defaulted", ()):
            fix = "name your trainer as study.trainer: module:function (the YAML names none: the example's ran)"
        raise ConfigError(source, "study.trainer", f"{where} failed ({type(e).__name__}: {e})", fix) from None
    data_dir = (config.get("data") or {}).get("dir")
    if isinstance(data_dir, str) and not Path(data_dir).is_dir():
        raise ConfigError(source, "data.dir", f"{data_dir} does not exist", "point data.dir at the experiment's data")


# ---------------------------------------------------------------- sampler and pruner
def build_sampler(config, seed_offset=0, source="config"):
    """This worker's sampler: the YAML's, or the default for the search space (samplers.py)."""
    spec = config["study"]["sampler"]
    seed = spec.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(source, "study.sampler.seed", f"{seed!r} is not an integer", "give seed as an int")
    unnamed = sorted(set(spec) - {"name", "seed"}) if "name" not in spec else []
    if unnamed:  # the default is one sampler or another (or two): options of which one?
        fix = "name the sampler they are for (name: TPESampler, say), or keep only seed for the default"
        raise ConfigError(source, "study.sampler", f"options {', '.join(unnamed)} without a sampler name", fix)
    space, n_trials = sampled_space(config), config["study"]["n_trials"]
    name, options = samplers.resolve(spec, space, n_trials, seed_offset)
    if name == samplers.PORTFOLIO:
        return samplers.portfolio(options.get("seed"))
    return _build(optuna.samplers, {"name": name, **options}, "study.sampler", source, config)


def describe_sampler(config):
    study = config["study"]
    return samplers.describe(study["sampler"], sampled_space(config), study["n_trials"], bool(study["objective"]))


def values_text(config, values):
    """'val_loss = 0.123, val_acc = 0.9': a trial's values named by the study's metrics."""
    values = values if isinstance(values, (list, tuple)) else [values]
    return ", ".join(f"{name} = {value:.6g}" for name, value in zip(metric_names(config), values, strict=False))


def sampled_space(config):
    """The YAML's search space, which a plain objective replaces with its own suggestions."""
    return {} if config["study"]["objective"] else config.get("search_space") or {}


def build_pruner(config, source="config"):
    spec = config["study"]["pruner"] or {"name": "NopPruner" if len(directions(config)) > 1 else "MedianPruner"}
    return _build(optuna.pruners, dict(spec), "study.pruner", source)


def _build(namespace, spec, key, source, config=None):
    """An Optuna sampler or pruner from its YAML form: {name: Class, option: value, ...}.

    An option that is itself {name: ...} is built the same way (PatientPruner's wrapped_pruner,
    PartialFixedSampler's base_sampler); GridSampler's grid comes from the YAML's search space.
    """
    name = spec.pop("name")
    cls = getattr(namespace, name, None)
    if not isinstance(cls, type):
        raise ConfigError(source, f"{key}.name", f"unknown {name!r}", f"use an optuna.{namespace.__name__[7:]} class")
    package = samplers.missing_package(name)
    if package:
        raise ConfigError(source, f"{key}.name", f"{name} needs the package {package}", f"pip install {package}")
    for option, value in list(spec.items()):
        if isinstance(value, dict) and isinstance(value.get("name"), str):
            spec[option] = _build(namespace, dict(value), f"{key}.{option}", source, config)
    if name == "GridSampler":
        cls = samplers.GridSampler  # ask/tell workers: an exhausted grid must not raise
        if "search_space" not in spec and config is not None:
            spec["search_space"] = grid_of(config, source)
    try:
        return cls(**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(source, key, f"bad option ({e})", f"see the options of optuna {name}") from None


def grid_of(config, source):
    """GridSampler's grid, from the search space: categorical choices, and int/float ranges with a step."""
    grid = {}
    for name, spec in (config.get("search_space") or {}).items():
        if spec["type"] == "categorical":
            grid[name] = list(spec["choices"])
        elif spec.get("step") is not None or spec["type"] == "int":
            step = spec.get("step") or 1
            count = int(round((spec["high"] - spec["low"]) / step)) + 1
            grid[name] = [round(spec["low"] + i * step, 12) for i in range(count)]
        else:
            raise ConfigError(
                source,
                f"search_space.{name}",
                "a float range without step has no grid",
                "give it a step for GridSampler",
            )
    if not grid:
        raise ConfigError(
            source, "study.sampler", "GridSampler needs a grid", "declare search_space, or sampler.search_space"
        )
    return grid


def base_params(config, source):
    """study.enqueue_base: the YAML's own values of the searched keys, measured first as the baseline."""
    params = {name: get_dotted(config, name) for name in config.get("search_space") or {}}
    for name, value in params.items():
        spec = config["search_space"][name]
        inside = (
            value in spec["choices"]
            if spec["type"] == "categorical"
            else (
                isinstance(value, (int, float)) and not isinstance(value, bool) and spec["low"] <= value <= spec["high"]
            )
        )
        if not inside:
            raise ConfigError(
                source,
                name,
                f"{value!r} lies outside search_space.{name}",
                "set a value inside it, or enqueue_base: false",
            )
    return params


# ---------------------------------------------------------------- storage and study
def run_dir(config):
    return Path(config["study"]["runs_dir"]) / config["study"]["study_name"]


def storage_url(config, storage_file=None):
    """Where the study lives; None means the journal file in the run directory.

    A --storage_file (written by submit_study.py for a URL given by flag or environment) comes first,
    then the --storage flag or the YAML's study.storage, then $OPTUNA_STORAGE as Optuna's CLI does.
    """
    if storage_file:
        try:
            return Path(storage_file).read_text().strip()
        except OSError as e:
            raise ConfigError(
                storage_file,
                "--storage_file",
                f"cannot read it ({e.strerror})",
                "submit again so that submit_study.py writes it",
            ) from None
    return config["study"]["storage"] or os.environ.get("OPTUNA_STORAGE")


def trusted_run_dir(config, group_access=None, reading=False, create=True):
    """The run directory, checked before anything in it is trusted; every opener of it calls this.

    It holds the storage (a journal snapshot is a pickle), the checkpoints and the array file, and
    study names are predictable: whoever makes runs/<study> first, or swaps it for a symlink, would
    own the study. So it must be a real folder, owned by this user, that nobody else may write in,
    and the group only with --group_access (group_access=None: the group's bits as the submission
    left them, which is what a worker keeps). One of ours that is too open (made by older versions,
    or chmod) is closed here, with a note. `reading` (status, export, report, dashboard, doctor):
    a teammate's folder is accepted too, but never a symlink nor one that others may write in.
    """
    folder = run_dir(config)
    if create and not reading:
        make_private_dirs(folder, 0o750 if group_access else 0o700, config)
    try:
        info = os.lstat(folder)
    except FileNotFoundError:
        return folder  # nothing to trust yet: the caller says there is no study
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        what = f"a symlink to {os.readlink(folder)}" if stat.S_ISLNK(info.st_mode) else "not a folder"
        raise run_dir_error(config, f"{folder} is {what}", f"remove it (rm {folder}) or choose another --runs_dir")
    if info.st_uid != os.geteuid():
        return _teammates(config, folder, info, reading)
    _close(config, folder, info.st_mode, group_access)
    return folder


def _teammates(config, folder, info, reading):
    """Another user's run directory: read it (a teammate's, --group_access) unless others may write in it."""
    owner = user_name(info.st_uid)
    if not reading:
        fix = f"use a runs_dir of your own (--runs_dir DIR), or have {owner} remove {folder}"
        raise run_dir_error(config, f"{folder} belongs to {owner}, not to you", fix)
    if info.st_mode & 0o002:
        problem = f"{folder} (of {owner}) is writable by others (mode {stat.S_IMODE(info.st_mode):04o})"
        raise run_dir_error(config, problem, f"{owner} runs: chmod o-rwx {folder}")
    return folder


def _close(config, folder, mode, group_access):
    """Our run directory: others get nothing; the group reads with --group_access (and writes only where
    the owner let it), and nothing without it (None: as the submission left it). Said when closed."""
    mode = stat.S_IMODE(mode)
    if group_access is None:
        wanted = mode & 0o770
    else:
        wanted = (mode & 0o770) | 0o050 if group_access else mode & 0o700
    if wanted == mode:
        return
    try:
        os.chmod(folder, wanted)
    except OSError as e:
        fix = f"chmod {wanted:04o} {folder}"
        raise run_dir_error(config, f"{folder} is mode {mode:04o} and cannot be closed ({e.strerror})", fix) from None
    if mode & ~wanted:
        print(f"note: {folder} was mode {mode:04o}, too open for a run directory: now {wanted:04o}", file=sys.stderr)


def run_dir_error(config, problem, fix):
    return ConfigError(config.path, "study.runs_dir", problem, fix)


def user_name(uid):
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def make_private_dirs(folder, mode, config=None):
    """Create folder and its missing parents with exactly `mode` (the umask does not widen nor narrow it)."""
    missing = []
    while not os.path.lexists(folder):
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            continue  # another worker made it: trusted_run_dir checks the run directory itself
        except OSError as e:
            if config is None:
                raise
            fix = "point runs_dir at a writable directory"
            raise run_dir_error(config, f"cannot create {path} ({e.strerror})", fix) from None
        os.chmod(path, mode)


def run_subdir(config, *parts):
    """A folder inside the run directory (trials/<n>, slurm_logs, report, ...): 0700, or 0750 where
    --group_access opened the run directory to the group; one left wider (older versions, a umask of
    002) is closed, since a teammate who can write there could swap a checkpoint."""
    top = run_dir(config)
    mode = 0o750 if os.stat(top).st_mode & 0o040 else 0o700
    folder = top.joinpath(*map(str, parts))
    make_private_dirs(folder, mode)
    for path in [top.joinpath(*map(str, parts[: i + 1])) for i in range(len(parts))]:
        info = os.lstat(path)
        if stat.S_IMODE(info.st_mode) & ~mode & 0o077 and info.st_uid == os.geteuid():
            os.chmod(path, mode)
    return folder


# The optional database drivers, by URL scheme: named in the error when one is missing.
DRIVERS = {
    "postgresql": "psycopg2-binary",
    "postgresql+psycopg2": "psycopg2-binary",
    "postgresql+psycopg": "'psycopg[binary]'",
    "mysql+pymysql": "PyMySQL",
}


def open_storage(config, url=None, source="config", reading=False):
    if not url:
        return journal.open_journal(trusted_run_dir(config, reading=reading) / "journal.log")
    if url.startswith("sqlite:///") and "timeout=" not in url:
        url += ("&" if "?" in url else "?") + "timeout=60"  # the 5 s default loses trials under load
    settings = config["study"]
    try:
        if url.split(":")[0].split("+")[0] in ("sqlite", "postgresql", "mysql"):
            # Optuna's heartbeats for RDB storages; liveness.fail_stale fails and retries the stale trials.
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=settings["heartbeat_interval"], grace_period=settings["grace_period"]
            )
        return optuna.storages.get_storage(url)
    except Exception as e:  # any driver error: unreachable, bad URL, missing driver
        why = mask_password((str(e).splitlines() or [""])[0])
        driver = DRIVERS.get(url.split(":")[0]) if isinstance(e, ImportError) else None
        folder = Path(url.split("?")[0][len("sqlite:///") :]).parent if url.startswith("sqlite:///") else None
        if driver:
            fix = f"pip install {driver}"
        elif folder and not folder.is_dir():
            fix = f"create the folder {folder} (mkdir -p), or point the URL at an existing one"
        else:
            fix = "check the URL, the server and its driver"
        raise ConfigError(
            source, "study.storage", f"cannot open {mask_password(url)} ({type(e).__name__}: {why})", fix
        ) from None


def open_study(config, storage, seed_offset=0, source="config"):
    return optuna.create_study(
        storage=storage,
        study_name=config["study"]["study_name"],
        directions=directions(config),
        sampler=build_sampler(config, seed_offset, source),
        pruner=build_pruner(config, source),
        load_if_exists=True,
    )


FULL = {errno.ENOSPC: "no space left on device (ENOSPC)", errno.EDQUOT: "disk quota exceeded (EDQUOT)"}


def full_filesystem(error):
    """A full disk or an exceeded quota: the filesystem's fault, neither the trial's nor the input's."""
    return isinstance(error, OSError) and error.errno in FULL


def full_filesystem_error(error, where, consequence):
    """The one line a script exits with on a full filesystem: which file, what, the fix, what happens next."""
    return f"error: {error.filename or where}: {FULL[error.errno]}; fix: free space or raise the quota; {consequence}"


URL = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"<>]*")
SECRET_QUERY = re.compile(r"([?&;](?:password|passwd)=)[^&;#]*", re.IGNORECASE)


def mask_password(text):
    """Every URL in text (a URL, or an error message holding one) with its credentials hidden.

    The one mask for whatever prints or logs a storage URL. Everything between '://' and the last '@'
    goes (user and password: a password may hold a raw '@', '/' or '?'), and so do the values of the
    query keys password and passwd. SQLAlchemy's own rendering shows the part of a password after a
    raw '@' and leaves ?password= as it is.
    """
    return URL.sub(lambda found: _mask_url(found.group(0)), text or "")


def _mask_url(url):
    scheme, _, rest = url.partition("://")
    at = -1 if rest.startswith("/") else rest.rfind("@")  # sqlite:///path: no credentials, maybe an '@'
    if at >= 0:
        rest = "***" + rest[at:]
    return f"{scheme}://{SECRET_QUERY.sub(lambda m: m.group(1) + '***', rest)}"


def without_credentials(settings):
    """A copy of the settings to write beside the trial (config.yaml): study.storage masked."""
    copied = copy.deepcopy(dict(settings))
    study = copied.get("study")
    if isinstance(study, dict) and study.get("storage"):
        study["storage"] = mask_password(study["storage"])
    return copied


def quote_command(words):
    return " ".join(shlex.quote(str(w)) for w in words)


def hostname():
    return socket.gethostname()


def yaml_budget(config):
    """The YAML's own n_trials, whatever --n_trials says."""
    return config.in_yaml.get("n_trials", config["study"]["n_trials"])


def study_budget(study, config):
    """The study's budget: the one number every "enough trials?" asks (claims, retries, cleaning, status, submit).

    --n_trials when given; else the YAML's n_trials if it was edited since the last submission; else the
    last submission's, which the study remembers (a budget raised by the flag stays). A study never
    submitted has the YAML's.
    """
    last, last_in_yaml = study.user_attrs.get("n_trials"), study.user_attrs.get("n_trials_in_yaml")
    if "n_trials" in config.overrides or last is None:
        return config["study"]["n_trials"]
    if last_in_yaml is not None and yaml_budget(config) != last_in_yaml:
        return yaml_budget(config)
    return last


def still_to_run(trials, budget):
    """The budget less the trials finished or running: what workers still have to do (WAITING retries included)."""
    return max(0, budget - sum(t.state in FINISHED or t.state == optuna.trial.TrialState.RUNNING for t in trials))


def count_states(trials):
    counts = {state.name: 0 for state in optuna.trial.TrialState}
    for trial in trials:
        counts[trial.state.name] += 1
    return counts
