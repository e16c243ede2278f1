"""The option table (OPTIONS): every study and slurm key once, with its flag, its check and its #SBATCH line.

An experiment YAML holds three kinds of keys:
  study:        how the study runs (name, budget, metric, sampler, pruner, storage, retries)
  slurm:        how each array task is scheduled (walltime, GPU, memory, ...)
  search_space: dotted paths into the config and how to sample them
Everything else (data, model, training, ...) is the trainer's own config, handed to it resolved.

Every study/slurm option is declared once in OPTIONS below: the YAML key, the argparse flag of
the same name, its check, and the #SBATCH line it renders to all come from that one table.
"""

import argparse
import difflib
import os
import re
from dataclasses import dataclass

SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
WALLTIME = re.compile(r"^(\d+-\d{1,2}(:\d{1,2}){0,2}|\d+(:\d{1,2}){0,2})$")
MEMORY = re.compile(r"^\d+[KMGTkmgt]?$")
SLURM_LIST = re.compile(r"^[A-Za-z0-9_.,-]+$")
CONSTRAINT = re.compile(r"^[A-Za-z0-9_.,|&*:\[\]()-]+$")
EMAIL = re.compile(r"^[A-Za-z0-9_.+-]+@[A-Za-z0-9.-]+$")
DIRECTIVE = re.compile(r"^--[a-z][a-z0-9-]*(=[A-Za-z0-9_.,:@%/+=-]+)?$")
# What the array file itself decides: a directive in the YAML must not change or bypass it.
OWN_DIRECTIVES = {
    "--wrap",
    "--array",
    "--output",
    "--error",
    "--open-mode",
    "--signal",
    "--requeue",
    "--ntasks",
    "--nodes",
}


class ConfigError(Exception):
    """A bad input: rendered as one line naming the file, the key and the fix; exit status 2."""

    def __init__(self, source: str | os.PathLike, key: str, problem: str, fix: str) -> None:
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
        return "must be a mapping with a 'name' (an Optuna class, or module:Class of your own) and its options"


def _sampler(value):
    if not isinstance(value, dict) or not isinstance(value.get("name", ""), str):
        return "must be a mapping: {seed: 0} for the default, or {name: <Optuna sampler or module:Class>, options}"


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
        None,
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
    Option("slurm", "trials_per_task", 1, _int_at_least(1), "trials one array task runs in turn: fewer, longer jobs"),
    Option(
        "slurm",
        "walltime",
        "1-00:00:00",
        _matches(WALLTIME, "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"),
        "time per array task",
        "--time={}",
    ),
    Option("slurm", "gpu_type", None, _matches(SAFE_NAME, "a GPU type such as rtx_4090"), "GPU type (none: any GPU)"),
    Option(
        "slurm",
        "gpus_per_task",
        1,
        _int_at_least(0),
        "GPUs per array task (0 = CPU-only tasks); per process when several",
    ),
    Option(
        "slurm",
        "tasks_per_trial",
        1,
        _int_at_least(1),
        "processes that train one trial together (DDP), one per GPU, launched by srun (docs/multi_gpu.md)",
    ),
    Option("slurm", "nodes_per_trial", 1, _int_at_least(1), "nodes a trial's processes spread over"),
    Option("slurm", "cpus_per_task", 1, _int_at_least(1), "CPUs per array task (per process)", "--cpus-per-task={}"),
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
        mapping = isinstance(option.default, (dict, list, bool)) or option.check is _mapping_with_name  # YAML only
        if option.section in sections and not mapping:
            kind = int if isinstance(option.default, int) else str
            parser.add_argument(
                f"--{option.key}", type=kind, help=f"{option.help} [{option.section}.{option.key}]".replace("%", "%%")
            )


def flag_overrides(args):
    """The study/slurm options given as flags."""
    return {o.key: getattr(args, o.key, None) for o in OPTIONS if getattr(args, o.key, None) is not None}
