"""Create (or load) an Optuna study and run it as a SLURM job array, one trial per task.

    python submit_study.py --exp_id baseline_LSTM_ishigami_cat      # submit: experiments/<id>/config.yaml
    python submit_study.py --config config.example.yaml --no-submit_jobs   # dry run: write and print
    python submit_study.py --config config.example.yaml --local 2   # no SLURM: 2 worker processes here
    python submit_study.py --config config.example.yaml --status    # trials, budget, best, SLURM tasks
    python submit_study.py --config config.example.yaml --export_best   # best_trial.yaml + best_trial.pt
    python submit_study.py --config config.example.yaml --report        # plots in runs/<study>/report/
    python submit_study.py --config config.example.yaml --dashboard 8080   # optuna-dashboard, 127.0.0.1 only
    python submit_study.py --config config.example.yaml --as_job    # a small job submits the array
    python submit_study.py --config config.example.yaml --throttle 2   # or --pause, --resume, --cancel

Submitting again with the same study name resumes the study: the array asks only for the trials
still missing (n_trials - finished - running), so a re-submission tops up what was lost and a larger
--n_trials extends a finished study. Every study/slurm key of the YAML has a flag of the same name.
"""

import argparse
import copy
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import yaml

from parallel_optuna import checkpoints, config_versions, failures, liveness, repeats, report, study_control
from parallel_optuna.config import config_from_args, read_text, read_yaml, yaml_from_args
from parallel_optuna.optimizer import base_params, build_pruner, build_sampler, describe_sampler, values_text
from parallel_optuna.options import (
    DEFAULT_TRAINER,
    OPTIONS,
    CommandLine,
    ConfigError,
    add_experiment_flags,
    flag_overrides,
)
from parallel_optuna.run_dir import full_filesystem, full_filesystem_error, run_dir, run_subdir, trusted_run_dir
from parallel_optuna.search_space import type_mismatches
from parallel_optuna.slurm import quote_command
from parallel_optuna.storage import journal
from parallel_optuna.study import (
    FINISHED,
    count_states,
    mask_password,
    open_storage,
    open_study,
    still_to_run,
    storage_url,
    study_budget,
    yaml_budget,
)
from parallel_optuna.user_code import load_objective, load_trainer, prepare_data, resolve_config

PROJECT = Path(__file__).resolve().parent
TEMPLATE = PROJECT / "array_job.sbatch"
SUBMIT_TEMPLATE = PROJECT / "templates" / "submit_job.sbatch"
FINISH_TEMPLATE = PROJECT / "templates" / "finish_job.sbatch"


def parse_args(argv=None):
    parser = CommandLine(description=__doc__.split("\n\n")[0])
    add_experiment_flags(parser, ("study", "slurm"))
    parser.add_argument("--cluster", action="store_true", help="stage the data to $SCRATCH (or --scratch) first")
    parser.add_argument(
        "--submit_jobs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--no-submit_jobs: dry run, write and print the array file and sbatch command only",
    )
    parser.add_argument("--local", type=int, metavar="K", help="run the study here with K worker processes")
    parser.add_argument("--group_access", action="store_true", help="let the group read the run directory")
    parser.add_argument("--status", action="store_true", help="show the study and its SLURM tasks")
    parser.add_argument("--trial", type=int, metavar="N", help="with --export_best: export trial N (a Pareto member)")
    parser.add_argument(
        "--check_storage",
        action="store_true",
        help="report torn journal lines, a stale journal lock and RUNNING trials without a worker",
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="with --check_storage: back up, then fix them (the journal is rewritten only while no worker lives)",
    )
    parser.add_argument(
        "--export_best",
        nargs="?",
        const="",
        metavar="PATH",
        help="write the best trial (default: best_trial.yaml beside the experiment YAML) and its weights (.pt)",
    )
    parser.add_argument("--report", action="store_true", help="plots of the study as PNGs in runs/<study>/report/")
    parser.add_argument(
        "--dashboard", nargs="?", const=8080, type=int, metavar="PORT", help="optuna-dashboard on 127.0.0.1:PORT"
    )
    parser.add_argument("--as_job", action="store_true", help="submit from a small SLURM job (1 CPU, 4G, 1 h)")
    parser.add_argument(
        "--storage_file", help="file holding the storage URL, instead of --storage (keeps a password off command lines)"
    )
    parser.add_argument(
        "--notify_on_finish",
        action=argparse.BooleanOptionalAction,
        help="once every task has ended, a small job exports the best trial [slurm.notify_on_finish]",
    )
    control = parser.add_mutually_exclusive_group()
    control.add_argument("--throttle", type=int, metavar="K", help="at most K tasks of the study at once, from now")
    control.add_argument("--pause", action="store_true", help="hold queued tasks; running trials finish")
    control.add_argument("--resume", action="store_true", help="release a paused study")
    control.add_argument("--cancel", action="store_true", help="stop the study now; submit again to continue it")
    return parser.parse_args(argv)


def main(argv=None):
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `--status | head` ends quietly
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    controls = args.throttle is not None or args.pause or args.resume or args.cancel
    config = None
    try:
        read_storage_file(args)
        check_flags(args)
        looking = args.status or args.export_best is not None or args.report or args.dashboard is not None
        if looking or controls or args.check_storage:
            config = config_versions.load(yaml_from_args(args), flag_overrides(args))  # works mid-edit too
            if args.check_storage:
                return check_storage(config, args.repair)
            study = open_existing_study(config, reading=not controls)  # a teammate may look, not steer
            return control(args, study, config) if controls else look(args, study, config)
        if args.as_job:
            return submit_as_job(args, config_from_args(args), argv)
        config = config_from_args(args)  # bound for the full-filesystem message below
        return submit(args, config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:  # a teammate's command on a study it may read but not write
        fix = "run it as the study's owner (the owner's --group_access lets the group read it)"
        print(f"error: {e.filename or e}: permission denied; fix: {fix}", file=sys.stderr)
        return 2
    except OSError as e:
        if not full_filesystem(e):
            raise
        where = run_dir(config) if config else "the run directory"
        print(full_filesystem_error(e, where, "then run the same command again"), file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def check_flags(args):
    if args.repair and not args.check_storage:
        raise ConfigError("--repair", "repair", "works only with --check_storage", "pass --check_storage --repair")
    if args.trial is not None and args.export_best is None:
        raise ConfigError("--trial", "trial", "works only with --export_best", "pass --export_best --trial N")


def read_storage_file(args):
    """--storage_file (what --as_job hands its job): the URL, from here on as if given by --storage."""
    if args.storage_file:
        if args.storage:
            raise ConfigError("--storage_file", "storage_file", "given with --storage", "pass one of them")
        args.storage = storage_url(None, args.storage_file)


def look(args, study, config):
    if args.report:
        return report.write_report(study, config)
    if args.dashboard is not None:
        return report.serve_dashboard(study, config, args.dashboard)
    return show_status(study, config) if args.status else export_best(study, config, args.export_best, args.trial)


def control(args, study, config):
    """--throttle K, --pause, --resume, --cancel: act on every array of the study (study_control.py)."""
    if args.throttle is not None:
        if args.throttle < 1:
            raise ConfigError("--throttle", "throttle", f"{args.throttle} tasks", "pass --throttle 1 or more")
        return study_control.throttle(study, args.throttle)
    if args.pause:
        return study_control.pause(study)
    return study_control.resume(study) if args.resume else study_control.cancel(study)


# ---------------------------------------------------------------- submit
def submit(args, config):
    storage, url, data_dir = check_and_prepare(args, config)
    # A dry run creates a new study (the printed array can then be submitted with sbatch as it is), but
    # leaves an existing one as it is: no version adopted, no budget recorded, no trial retried.
    leave_as_is = not args.submit_jobs and args.local is None and exists(config, storage)
    study = open_study(config, storage, 0, config.path)
    config_versions.check_study(study, config)
    if study_control.mark(study) == study_control.PAUSED and args.local is not None:
        raise ConfigError(config.path, "study", "the study is paused", "resume it first (--resume)")
    use_budget(study, config)
    if leave_as_is:
        say_where_it_stands(study, config, url)
        use_throttle(study, config)
        if "n_trials" in config.overrides:
            print(f"note: a dry run records no budget: submit with --n_trials {config['study']['n_trials']} to set it")
    else:
        config_versions.adopt(config_versions.versions_folder(config), config, read_text(config.path))
        take_stock(study, config, url)
        take_controls(study, config)
    storage_file = storage_reference(config, url)
    if args.local is not None:
        return run_local(args, config, study, storage_file)
    return submit_array(args, config, study, data_dir, storage_file)


def check_and_prepare(args, config):
    """Everything that can be wrong is checked before a file is written or a study created."""
    url, storage = check_inputs(args, config)
    prepare_data(config, config.path)
    data_dir = stage_data(config) if args.cluster else None
    trusted_run_dir(config, args.group_access)  # created (or closed) once all passed
    storage = storage or open_storage(config, None, config.path)  # the journal file
    return storage, url, data_dir


def check_inputs(args, config):
    """The checks that need no data and write nothing: the URL and an opened storage (None: journal file)."""
    source = config.path
    if config["study"]["objective"]:
        load_objective(config, source)  # an import error fails here, not in every array task
    else:
        load_trainer(config, source)
    build_sampler(config, 0, source), build_pruner(config, source)
    if config["study"]["enqueue_base"]:
        base_params(config, source)
    if args.local is not None and args.local < 1:
        raise ConfigError("--local", "local", f"{args.local} workers", "pass --local 1 or more")
    if args.submit_jobs and args.local is None and not shutil.which("sbatch"):
        raise ConfigError(
            "sbatch",
            "(command)",
            "sbatch is not on PATH",
            "run on a SLURM login node, or use --local K or --no-submit_jobs",
        )
    if args.submit_jobs and args.local is None:
        check_request(config)
    if args.cluster:
        scratch_dir(config)
    trusted_run_dir(config, args.group_access, create=False)  # one there already: before anything is written
    url = storage_url(config)
    return url, open_storage(config, url, source) if url else None  # an unreachable server fails first


# Which key a refusal of `sbatch --test-only` most likely names, by words of SLURM's message.
REFUSED = [
    ("invalid account", "slurm.account"),  # "Invalid account or account/partition combination specified"
    ("qos", "slurm.qos"),  # "Job violates accounting/QOS policy" too: a QOS limit
    ("partition", "slurm.partition"),
    ("time limit", "slurm.walltime"),
    ("feature", "slurm.constraint"),
    ("gres", "slurm.gpus_per_task"),
    ("memory", "slurm.mem_per_cpu"),
    ("node configuration", "slurm.mem_per_cpu"),  # what slurmctld says of memory or CPUs no node has
]


def check_request(config):
    """Ask SLURM whether it could run one task as configured (`sbatch --test-only`), before any study exists."""
    flags = [line.removeprefix("#SBATCH ") for line in sbatch_directives(config["slurm"]).splitlines()]
    try:
        result = subprocess.run(
            ["sbatch", "--test-only", *flags, "--wrap=true"], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        return  # a slow controller: the submit itself will say what it says
    if result.returncode != 0:
        problem = " ".join(result.stderr.split())[:300]
        key = next((key for words, key in REFUSED if words in problem.lower()), "slurm")
        raise ConfigError(
            config.path,
            key,
            f"sbatch refuses the request ({problem})",
            "ask for what the cluster has (sinfo -o '%P %l %m %c %G'), or --no-submit_jobs to write the array only",
        )


def take_stock(study, config, url):
    """Say where the study stands, record the budget, and fail + retry trials whose workers died."""
    say_where_it_stands(study, config, url)
    if failures.stopping(study, config):
        print("note: the trainer failed every trial since the last submit; trials start again now", file=sys.stderr)
    study.set_user_attr(failures.RESET, now())
    if config["study"]["enqueue_base"] and not study.get_trials(deepcopy=False):
        study.enqueue_trial(base_params(config, config.path), user_attrs={"baseline": True})
        print("the YAML's own values are enqueued as the first trial (study.enqueue_base)")
    budget = study_budget(study, config)
    study.set_user_attr("n_trials", budget)  # what study_budget remembers for workers, status and later submits
    study.set_user_attr("n_trials_in_yaml", yaml_budget(config))
    study.set_user_attr("optimization_metric", config["study"]["optimization_metric"])
    failed = liveness.reconcile(study, config)
    if failed:
        print(f"trials {failed} had lost their workers: failed and re-enqueued")


def say_where_it_stands(study, config, url):
    print(
        f"study {study.study_name}: {len(study.get_trials(deepcopy=False))} trials so far, "
        f"storage {mask_password(url) if url else run_dir(config) / 'journal.log'}"
    )
    if url and url.startswith("sqlite"):
        print(
            "warning: SQLite may hand one retried trial to two workers at once; the journal file (default) "
            "or PostgreSQL never does",
            file=sys.stderr,
        )
    if config["study"]["objective"]:
        if config.get("search_space") or "trainer" not in config.defaulted:
            objective = config["study"]["objective"]
            print(f"note: study.objective {objective} runs; the YAML's trainer and search_space are not used")
    elif "trainer" in config.defaulted:
        print(
            f"note: {config.path}: no study.trainer, so the example's {DEFAULT_TRAINER} trains; "
            "name yours as study.trainer: module:function",
            file=sys.stderr,
        )
    unset = [f"study.{key}" for key in ("optimization_metric", "optimization_direction") if key in config.defaulted]
    if unset and config["study"]["objective"] or "optimization_direction" in config.defaulted:
        metric, direction = config["study"]["optimization_metric"], config["study"]["optimization_direction"]
        print(f"note: {config.path}: no {' nor '.join(unset)}: the study will {direction} {metric}", file=sys.stderr)
    if not config["study"]["objective"] and not config.get("search_space"):
        once = "" if config["study"]["allow_repeats"] else ", trained once, the other trials answered from it"
        print(f"warning: {config.path}: search_space is empty: one config{once}", file=sys.stderr)
    for mismatch in type_mismatches(config):
        print(f"warning: {config.path}: {mismatch}", file=sys.stderr)
    if config["slurm"]["gpu_type"] and not config["slurm"]["gpus_per_task"]:
        print(f"note: slurm.gpu_type {config['slurm']['gpu_type']} is not asked for: slurm.gpus_per_task is 0")
    if config["study"]["sampler"].get("name") == "GridSampler":
        print(
            "warning: GridSampler: parallel workers may train the same grid point twice (optuna#4627)",
            file=sys.stderr,
        )


def exists(config, storage):
    return config["study"]["study_name"] in optuna.get_all_study_names(storage)


def use_budget(study, config):
    """Say the budget in force (study.study_budget) when it is not the YAML's; take_stock records it."""
    before, budget, in_yaml = study.user_attrs.get("n_trials"), study_budget(study, config), yaml_budget(config)
    if budget == before and budget != in_yaml and "n_trials" not in config.overrides:
        print(f"budget: {budget} finished trials, the last --n_trials (the YAML says {in_yaml})")
    if before is not None and before != budget:
        print(f"budget: {before} -> {budget} finished trials")


def use_throttle(study, config):
    """The throttle in force: --max_concurrent_jobs, else the last --throttle, else the YAML's."""
    slurm = config["slurm"]
    if "max_concurrent_jobs" not in config.overrides:
        slurm["max_concurrent_jobs"] = study.user_attrs.get("max_concurrent_jobs", slurm["max_concurrent_jobs"])


def take_controls(study, config):
    """At a (re)submission: the throttle in force and the trials stopped by hand (study_control.py)."""
    if "max_concurrent_jobs" in config.overrides:
        study.set_user_attr("max_concurrent_jobs", config["slurm"]["max_concurrent_jobs"])
    use_throttle(study, config)
    retried = study_control.resume_stopped(study, study_budget(study, config))
    if retried:
        print(f"trials {retried} were stopped by hand: they continue from their checkpoints as linked retries")


def submit_array(args, config, study, data_dir, storage_file):
    """Render the array file for the trials still missing and submit it (or print it: dry run)."""
    tasks = liveness.squeue_tasks(study_jobs(study))
    queued = queued_tasks(study, tasks)
    missing = remaining(study, config) - queued
    script = write_array_file(config, max(missing, 1), data_dir, storage_file)
    if missing <= 0:
        print(
            f"budget met: {study_budget(study, config)} trials finished, running or queued ({queued} tasks "
            f"waiting); nothing to submit (raise --n_trials to extend the study)"
        )
        return 0
    max_size = max_array_size() if args.submit_jobs else 1001
    # %K holds per array: a top-up starts once the study's arrays still in the queue have ended, so that
    # the study never runs more than K tasks at once.
    active = sorted({key.split("_")[0] for key in tasks or {}})
    if active:
        print(f"the study's array(s) {', '.join(active)} still run: the new array waits for them (%K is per array)")
    commands = sbatch_commands(script, missing, max_size, config["slurm"]["max_concurrent_jobs"], active)
    if study_control.mark(study) == study_control.PAUSED:
        commands = [(n, [c[0], "--hold", *c[1:]]) for n, c in commands]
        print("the study is paused: the new tasks wait, held, until --resume")
    if not args.submit_jobs:
        print(script.read_text())
        shown = [quote_command([w + "<previous job id>" if w == DEPENDENCY else w for w in c]) for _, c in commands]
        print("dry run, nothing submitted; to submit:\n  " + "\n  ".join(shown))
        return 0
    code = submit_arrays(study, config, commands)
    if code == 0 and config["slurm"]["notify_on_finish"]:
        submit_finish_job(study, config)
    return code


def remaining(study, config):
    return still_to_run(study.get_trials(deepcopy=False), study_budget(study, config))


def study_jobs(study):
    """The study's array jobs: those it submitted and those of trials still RUNNING (hand-submitted ones)."""
    submitted = {j["job_id"] for j in study.user_attrs.get("array_jobs", [])}
    return submitted | liveness.running_jobs(study.get_trials(deepcopy=False))


def queued_tasks(study, tasks):
    """The study's array tasks that SLURM still holds but that have not taken a trial yet."""
    taken = {t.user_attrs.get("slurm_task") for t in study.get_trials(deepcopy=False) if t.state == liveness.RUNNING}
    return sum(1 for key in tasks or {} if key not in taken)


def stage_data(config):
    source, target = scratch_dir(config)
    shutil.copytree(source, target, dirs_exist_ok=True)
    print(f"data staged: {source} -> {target}")
    return target


def scratch_dir(config):
    """(data.dir, where --cluster stages it)."""
    scratch = config["slurm"]["scratch"] or os.environ.get("SCRATCH")
    if not scratch:
        raise ConfigError(
            config.path,
            "slurm.scratch",
            "--cluster needs a scratch directory",
            "set $SCRATCH, pass --scratch DIR or set slurm.scratch",
        )
    source = (config.get("data") or {}).get("dir")
    if not source:
        raise ConfigError(
            config.path,
            "data.dir",
            "--cluster stages data.dir, which is not set",
            "set data.dir to the experiment's data directory",
        )
    return source, Path(scratch).expanduser() / config["study"]["study_name"] / "data"


# ---------------------------------------------------------------- the array file
def sbatch_directives(slurm):
    lines = [f"#SBATCH {o.sbatch.format(slurm[o.key])}" for o in OPTIONS if o.sbatch and slurm.get(o.key) is not None]
    if slurm["gpus_per_task"]:
        gpus = f"{slurm['gpu_type']}:{slurm['gpus_per_task']}" if slurm["gpu_type"] else slurm["gpus_per_task"]
        lines.append(f"#SBATCH --gpus={gpus}")
    lines += [f"#SBATCH {d}" for d in slurm["extra_directives"]]
    return "\n".join(lines)


# By reference (a password), named above, or found on the study: a budget pinned on a queued array
# would outlive a later --n_trials or edit of the YAML (study.study_budget).
FROM_ELSEWHERE = ("storage", "study_name", "runs_dir", "n_trials")


def worker_flags(config, storage_file):
    """What every worker is told beyond its YAML: this submission's study flags and the storage."""
    # The study's name and place always: an edit of the YAML cannot point a running array at another study.
    flags = ["--config", config.path, "--study_name", config["study"]["study_name"]]
    flags += ["--runs_dir", config["study"]["runs_dir"]]
    for option in OPTIONS:
        if option.key in config.overrides and option.section == "study" and option.key not in FROM_ELSEWHERE:
            flags += [f"--{option.key}", str(config["study"][option.key])]
    return flags + (["--storage_file", str(storage_file)] if storage_file else [])


def storage_reference(config, url):
    """A URL from the command line or the environment may hold a password: workers get it from a 0600 file."""
    if not url or (config["study"]["storage"] and "storage" not in config.overrides):
        return None  # the journal file, or a URL the workers read from the YAML themselves
    storage_file = trusted_run_dir(config) / "storage_url"
    fd = os.open(storage_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # one written by older versions may be wider
    with os.fdopen(fd, "w") as f:
        f.write(url + "\n")
    return storage_file


def write_array_file(config, n_tasks, data_dir, storage_file):
    folder, slurm = run_dir(config), config["slurm"]
    run_subdir(config, "slurm_logs")
    python = "python" if slurm["setup"] else sys.executable  # setup lines bring their own environment
    command = [python, PROJECT / "worker.py", *worker_flags(config, storage_file), "--trials", "1"]
    script = folder / "array_job.sbatch"
    script.write_text(
        TEMPLATE.read_text().format(
            study_name=config["study"]["study_name"],
            script=script,
            job_name=study_control.job_name(config["study"]["study_name"]),
            array=f"0-{n_tasks - 1}%{slurm['max_concurrent_jobs']}",
            log_dir=folder / "slurm_logs",
            signal_grace=slurm["signal_grace"],
            directives=sbatch_directives(slurm),
            setup="\n".join(slurm["setup"]) or "# (none)",
            pythonpath=pythonpath_line(),
            workdir=quote_command([os.getcwd()]),
            worker_command=quote_command(command + (["--data_dir", data_dir] if data_dir else [])),
        )
    )
    return script


def pythonpath_line():
    """The array tasks import the user's code with the PYTHONPATH of the submission."""
    path = os.environ.get("PYTHONPATH")
    return f"export PYTHONPATH={quote_command([path])}" if path else "# (PYTHONPATH was not set at submit time)"


def max_array_size():
    """Array indexes must stay below the cluster's MaxArraySize (default 1001)."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return 1001
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out.stdout, re.MULTILINE)
    return int(match.group(1)) if match else 1001


DEPENDENCY = "--dependency=afterany:"


def sbatch_commands(script, n_tasks, max_size, throttle, after=()):
    """One sbatch per chunk of at most MaxArraySize tasks, each chunk waiting for the one before so %K holds.

    Returns (tasks, command) pairs; a chunk's DEPENDENCY gets the previous chunk's job id when submitted.
    The first chunk waits for the jobs `after` (the study's arrays still queued or running), if any.
    """
    sizes = [min(max_size, n_tasks - start) for start in range(0, n_tasks, max_size)]
    first = [f"{DEPENDENCY}{':'.join(after)}"] if after else []
    return [
        (
            size,
            ["sbatch", "--parsable", *([DEPENDENCY] if i else first), f"--array=0-{size - 1}%{throttle}", str(script)],
        )
        for i, size in enumerate(sizes)
    ]


def submit_arrays(study, config, commands):
    jobs = list(study.user_attrs.get("array_jobs", []))
    previous = None
    for tasks, command in commands:
        command = [word + previous if word == DEPENDENCY else word for word in command]
        result = sbatch(command)
        if result.returncode != 0 and previous is None and "dependency" in result.stderr.lower():
            command = [word for word in command if not word.startswith(DEPENDENCY)]  # those arrays just ended
            result = sbatch(command)
        if result.returncode != 0:
            print(f"error: {quote_command(command)} failed: {result.stderr.strip()}", file=sys.stderr)
            return 1
        previous = result.stdout.strip().split(";")[0]
        jobs.append({"job_id": previous, "tasks": tasks, "submitted_at": now()})
        study.set_user_attr("array_jobs", jobs)
        print(f"submitted array job {previous}: {tasks} tasks")
    folder = run_dir(config)
    which = quote_command(["--config", config.path, "--study_name", config["study"]["study_name"]])
    print(
        "watch it:\n"
        f"  squeue --me --array --jobs={','.join(j['job_id'] for j in jobs[-len(commands) :])}\n"
        f"  {this_script()} {which} --status\n"
        f"  tail -f {folder}/slurm_logs/optuna_{previous}_*.out"
    )
    return 0


SBATCH_TIMEOUT_S = 120


def sbatch(command):
    """Run sbatch with a timeout; a timeout is a failure that says the array may be queued all the same."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        why = f"no answer within {SBATCH_TIMEOUT_S} s: it may be queued all the same; check squeue --me first"
        return subprocess.CompletedProcess(command, 1, "", why)


def this_script():
    """This script as a command that runs from any folder, without an activated virtual environment."""
    return quote_command([sys.executable, PROJECT / "submit_study.py"])


# ---------------------------------------------------------------- jobs around the array
MAX_TASK_LINES = 20  # status lists every array task with something to say, and this many of the rest
FINISH_STEPS = [["--status"], ["--export_best"]]  # what the finish job runs; add ["--report"] here once it exists


def render_job(template, config, filename, **fields):
    """A small job file in the run directory, from one of templates/."""
    slurm, folder = config["slurm"], trusted_run_dir(config)
    run_subdir(config, "slurm_logs")
    directives = [f"#SBATCH --{key}={slurm[key]}" for key in ("partition", "account", "qos") if slurm[key]]
    script = folder / filename
    script.write_text(
        template.read_text().format(
            study_name=config["study"]["study_name"],
            log_dir=folder / "slurm_logs",
            workdir=quote_command([os.getcwd()]),
            directives="\n".join(directives + fields.pop("directives", [])),
            setup="\n".join(slurm["setup"]) or "# (none)",
            **fields,
        )
    )
    return script


def python_in_jobs(config):
    return "python" if config["slurm"]["setup"] else sys.executable  # setup lines bring their own environment


def submit_as_job(args, config, argv):
    """--as_job: check everything here, then a small job runs this same command without --as_job."""
    check_inputs(args, config)
    name = config["study"]["study_name"]
    reference = storage_reference(config, storage_url(config))
    command = [python_in_jobs(config), PROJECT / "submit_study.py", *job_arguments(argv, reference)]
    script = render_job(
        SUBMIT_TEMPLATE,
        config,
        "submit_job.sbatch",
        job_name=study_control.submit_job_name(name),
        command=quote_command(command),
    )
    if not args.submit_jobs:
        print(script.read_text() + f"dry run, nothing submitted; to submit:\n  sbatch {script}")
        return 0
    job = study_control.run(["sbatch", "--parsable", str(script)]).strip().split(";")[0]
    print(
        f"submitted job {job}: it submits the array of study {name}\n"
        f"  squeue --me --jobs={job}\n  cat {run_dir(config)}/slurm_logs/optuna_submit_{name}_{job}.out"
    )
    return 0


def job_arguments(argv, storage_file):
    """The command line for the job: without --as_job, and a storage URL (it may hold a password) by reference."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in ("--storage", "--storage_file"):
            skip = True  # and its value
        elif word != "--as_job" and not word.startswith(("--storage=", "--storage_file=")):
            words.append(word)
    return words + (["--storage_file", str(storage_file)] if storage_file else [])


def submit_finish_job(study, config):
    """--notify_on_finish: one small job once every array task of the study has ended."""
    name, slurm = f"optuna_finish_{study.study_name}", config["slurm"]
    study_control.run(["scancel", "--me", f"--name={name}", "--state=PENDING"])  # it replaces an earlier one
    which = ["--config", config.path, "--study_name", study.study_name]
    which += ["--runs_dir", config["study"]["runs_dir"]]
    steps = [quote_command([python_in_jobs(config), PROJECT / "submit_study.py", *which, *s]) for s in FINISH_STEPS]
    mail = ["#SBATCH --mail-type=END,FAIL", f"#SBATCH --mail-user={slurm['mail_user']}"] if slurm["mail_user"] else []
    script = render_job(
        FINISH_TEMPLATE, config, "finish_job.sbatch", job_name=name, directives=mail, commands="\n".join(steps)
    )
    arrays = sorted(study_control.queued_arrays(study))
    job = study_control.run(["sbatch", "--parsable", f"{DEPENDENCY}{':'.join(arrays)}", str(script)]).strip()
    print(f"submitted finish job {job}: exports the best trial once arrays {', '.join(arrays)} have ended")


# ---------------------------------------------------------------- local workers
class LocalStop:
    """Ctrl-C of a local run: the first stops the workers at their next checkpoint, the second kills them."""

    def __init__(self, workers):
        self.workers, self.count = workers, 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.count += 1
        alive = [w for w in self.workers if w.poll() is None]
        if self.count == 1:
            print(
                "stopping: running trials checkpoint and end as interrupted (Ctrl-C again: stop at once)",
                file=sys.stderr,
            )
        for w in alive:
            if self.count == 1:
                w.send_signal(signal.SIGINT)
            else:
                w.kill()


def run_local(args, config, study, storage_file):
    """K worker processes on this machine, each running trials until the budget is met."""
    command = [sys.executable, str(PROJECT / "worker.py"), *worker_flags(config, storage_file), "--trials", "0"]
    print(f"running {args.local} local workers: {quote_command(command)}")
    first = len(study.get_trials(deepcopy=False))  # a resumed study gets new seeds, not the old ones again
    workers = [subprocess.Popen(command + ["--seed_offset", str(first + i)]) for i in range(args.local)]
    stop = LocalStop(workers)
    codes = [w.wait() for w in workers]
    if stop.count:
        print(
            "stopped; run the same command again to continue the interrupted trials from their checkpoints",
            file=sys.stderr,
        )
        return 130
    show_status(study, config)
    trials = study.get_trials(deepcopy=False)
    if any(t.state in FINISHED for t in trials):
        export_best(study, config, "")
    for w, code in zip(workers, codes, strict=True):
        if code < 0:  # killed from outside: it could say nothing, and its trial was retried like a dead task's
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            print(
                f"warning: local worker {w.pid} was killed ({name}); its trial was failed and retried", file=sys.stderr
            )
    if any(c > 1 for c in codes):
        return 1  # a worker ended on an error it has named itself (a bad config, a full disk)
    short = still_to_run(trials, study_budget(study, config))
    if short and not study_control.mark(study):  # the workers gave up: their trials kept failing
        print(
            f"error: {short} trial(s) of the budget did not finish; "
            "fix: see why above (make status), then run the same command again",
            file=sys.stderr,
        )
        return 1
    return 0


# ---------------------------------------------------------------- status
def open_existing_study(config, reading=True):
    """The submitted study, for status and export; creates nothing. `reading`: a teammate's run directory will do."""
    trusted_run_dir(config, reading=reading, create=False)
    name, saved_url = config["study"]["study_name"], run_dir(config) / "storage_url"
    url = storage_url(config) or (storage_url(config, saved_url) if saved_url.exists() else None)
    if not url and not (run_dir(config) / "journal.log").exists():
        raise ConfigError(
            config.path,
            "study.study_name",
            f"no study {name!r} in {run_dir(config)}",
            "submit it first, or pass the --study_name it was submitted with",
        )
    storage = open_storage(config, url, config.path, reading)
    if name not in optuna.get_all_study_names(storage):  # summaries would deep-copy every trial
        raise ConfigError(
            config.path,
            "study.study_name",
            f"no study {name!r} in the storage",
            "submit it first, or pass the --study_name it was submitted with",
        )
    return optuna.load_study(study_name=name, storage=storage)


def show_status(study, config):
    jobs = study_jobs(study)
    tasks = liveness.squeue_tasks(jobs)
    liveness.reconcile(study, config, tasks)
    trials = study.get_trials(deepcopy=False)
    counts = count_states(trials)
    budget = study_budget(study, config)
    finished = counts["COMPLETE"] + counts["PRUNED"]
    print(f"study {study.study_name}: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"progress {progress_bar(finished, budget)} {finished}/{budget} finished")
    concurrency = study.user_attrs.get("max_concurrent_jobs", config["slurm"]["max_concurrent_jobs"])
    # None when unknown: squeue failed, or no array is known yet (one submitted by hand shows once it runs)
    queued = queued_tasks(study, tasks)
    workers = None if tasks is None or not jobs else queued + counts["RUNNING"]
    print(eta_line(trials, budget, concurrency, study_control.mark(study), workers))
    for line in config_versions.status_lines(config, trials) + repeats.status_lines(config, trials):
        print(line)
    print(f"sampler: {describe_sampler(config)}")
    print_best(study, config, counts)
    print_running(study, trials)
    failed = [t for t in trials if t.state.name == "FAIL"]
    for t in failed[-10:]:
        reason = t.user_attrs.get("fail_reason", "no heartbeat within grace_period (worker died)")
        print(f"  trial {t.number} FAIL: {' '.join(reason.split())}")
    if jobs:
        print_slurm_tasks(study, trials, tasks)
    streak = failures.stopping(study, config, trials)
    if streak:
        print(
            f"{failures.describe(streak)}: array tasks start no new trial until a submit or an edit of the YAML "
            "or the trainer's file"
        )
    print_top_up(remaining(study, config) - queued, failed, streak)
    print(disk_line(study, config))
    return 0


def print_best(study, config, counts):
    best = best_trial(study)
    if best:
        print(f"best: trial {best.number}  {values_text(config, best.values)}  params {best.params}")
    elif len(study.directions) > 1 and counts["COMPLETE"]:
        front = study.best_trials
        print(f"Pareto front: {len(front)} trial(s)")
        for t in front[:10]:
            print(f"  trial {t.number}  {values_text(config, t.values)}  params {t.params}")


def print_running(study, trials):
    """Each RUNNING trial: where it runs, for how long, and its last logged step."""
    running = [t for t in trials if t.state == liveness.RUNNING]
    if running:
        print("running:")
    for t in running:
        a = t.user_attrs
        where = f"  task {a['slurm_task']}" if a.get("slurm_task") else ""
        age = duration(trial_seconds(t))
        step = study_control.last_step(a["log_path"]) if a.get("log_path") else None
        last = f"  step {step[0]} ({step[1]}) {duration(time.time() - step[2].timestamp())} ago" if step else ""
        if not step and t.intermediate_values:  # a plain objective's trial.report: no log line, the storage has it
            reported = max(t.intermediate_values)
            last = f"  step {reported} ({t.intermediate_values[reported]:.6g})"
        print(f"  trial {t.number}  host {a.get('host', '?')}  pid {a.get('pid', '?')}  age {age}{where}{last}")


def print_top_up(missing, failed, streak):
    """What to do when the budget is not covered by queued or running tasks."""
    if missing <= 0:
        return
    crashed = [t for t in failed if failures.in_the_trainer(t)]
    if crashed:
        print(f"{len(crashed)} trial(s) failed in the trainer (reasons above, tracebacks in their worker.log)")
    todo = "fix the trainer, then submit again" if streak else "submit again to top up"
    print(f"{missing} trial(s) not covered by any worker: {todo}")


def disk_line(study, config):
    """The run directory's size (du, at most 10 s), after deleting the checkpoints nobody will read."""
    files, freed = checkpoints.clean(study, config)
    used = checkpoints.disk_usage(run_dir(config))
    line = f"disk: {run_dir(config)} " + (checkpoints.size(used) if used is not None else "? (du took over 10 s)")
    return line + (f" ({files} old checkpoint/weights files deleted, {checkpoints.size(freed)} freed)" if files else "")


def eta_line(trials, budget, concurrency, mark, workers):
    """When the budget will be met, at the study's concurrency; `workers`: trials running and tasks queued."""
    if mark:
        return f"{mark}: no new trial starts (--resume{'' if mark == 'paused' else ' or submit again'})"
    if sum(t.state in FINISHED for t in trials) >= budget:
        return "ETA: budget met"
    if workers == 0:
        return "ETA: none, no worker is running or queued"
    seconds = study_control.eta_seconds(trials, budget, concurrency)
    if seconds is None:
        return f"ETA: once a trial has finished ({concurrency} at once)"
    if seconds < 1:  # what is left is running, past the mean time of a finished trial
        return f"ETA: when the running trials end (past the mean time of a finished trial; {concurrency} at once)"
    return f"ETA: ~{duration(seconds)} ({concurrency} at once)"


def print_slurm_tasks(study, trials, tasks):
    """One line per array task and trial: SLURM's view (one squeue, at most one sacct) joined with the study."""
    job_ids = sorted(study_jobs(study))
    queued = {
        k: "HELD" if state == "PENDING" and "held" in reason.lower() else state
        for k, (state, _, reason) in (tasks or {}).items()
    }
    states = {**sacct_states(job_ids), **queued}
    by_task = {}
    for t in trials:
        if t.user_attrs.get("slurm_task", "").split("_")[0] in job_ids:
            by_task.setdefault(t.user_attrs["slurm_task"], []).append(t)
    rows = [(key, t) for key in sorted(set(states) | set(by_task), key=task_order) for t in by_task.get(key) or [None]]
    # A large array: the tasks that ended with their trial finished are the many and the dull; the last few show.
    dull = [i for i, (key, t) in enumerate(rows) if t and t.state in FINISHED and states.get(key, "ended") != "RUNNING"]
    hidden = set(dull[:-MAX_TASK_LINES]) if len(rows) > 2 * MAX_TASK_LINES else set()
    shown = [(key, t) for i, (key, t) in enumerate(rows) if i not in hidden]
    values = [", ".join(f"{v:.6g}" for v in t.values) if t and t.values else "-" for _, t in shown]  # several too
    width = max([12, *map(len, values)])
    print(f"{'array task':<14}{'slurm':<12}{'trial':>6}  {'state':<9}{'value':>{width}}  {'elapsed':>9}  log")
    if hidden:
        print(f"  ({len(hidden)} earlier array tasks ended with their trial finished: not listed)")
    for (key, t), value in zip(shown, values, strict=True):
        elapsed = duration(trial_seconds(t)) if t else "-"
        print(
            f"{key:<14}{states.get(key, 'ended'):<12}{t.number if t else '-':>6}  {t.state.name if t else '-':<9}"
            f"{value:>{width}}  {elapsed:>9}  {t.user_attrs.get('slurm_out', '-') if t else '-'}"
        )


def sacct_states(job_ids):
    """Finished tasks' states from one sacct call; {} where accounting is off."""
    if not shutil.which("sacct"):
        return {}
    command = ["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(job_ids)}"]
    try:
        out = subprocess.run([*command, "--format=JobID,State"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        print("note: sacct did not answer within 60 s: ended tasks show as 'ended'")
        return {}
    if out.returncode != 0:
        return {}
    return dict(line.split("|")[:2] for line in out.stdout.splitlines() if "|" in line)


def trial_seconds(trial):
    """Training time of a finished trial; time since the start of a running one."""
    if trial.state == liveness.RUNNING and trial.datetime_start:
        return (datetime.now() - trial.datetime_start).total_seconds()
    if "train_seconds" not in trial.user_attrs and trial.datetime_start and trial.datetime_complete:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()  # failed before it counted
    return trial.user_attrs.get("train_seconds", 0)


def task_order(key):
    job, _, task = key.partition("_")
    return (int(job) if job.isdigit() else 0, int(task) if task.isdigit() else 0)


def progress_bar(done, total, width=30):
    filled = min(width, round(width * done / total)) if total else 0
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def duration(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def now():
    return time.strftime("%Y-%m-%dT%H:%M:%S")


# ---------------------------------------------------------------- storage check and repair
def check_storage(config, repair):
    """--check_storage: the journal's bad lines, a stale lock, RUNNING trials whose worker is gone.

    With --repair, after a backup of the journal: the stale lock is removed, the stuck trials are
    failed and retried (as any reconcile does), and the journal is rewritten without its bad lines
    so that Optuna's own reader reads it again; that only while no worker of the study lives and no
    other process has the study open (journal_readers), since live readers hold byte offsets into it.
    Exit 0 when the storage is (now) sound, else 1.
    """
    path = journal_file(config)
    bad = report_journal(path) if path else []
    lock_age = path and journal.stale_lock(path)
    if lock_age:
        print(f"stale lock {journal.lock_path(path)}: held {lock_age:.0f} s by nobody, its holder died mid-append")
    study = open_existing_study(config, reading=not repair)
    tasks = liveness.squeue_tasks(study_jobs(study))
    stuck = stuck_trials(study, tasks)
    if not repair:
        return storage_verdict(config, len(bad) + bool(lock_age) + len(stuck))
    if path and (bad or lock_age or stuck):
        print(f"backup: {journal.backup(path)}")
    if lock_age:
        journal.break_lock(path)  # before the reconcile below, whose writes would wait for it
        print("removed the stale lock")
    if stuck:
        print(f"failed and re-enqueued: trials {liveness.reconcile(study, config, tasks)}")
    fixed = rewrite_journal(path, study, tasks, len(bad)) if bad else 0
    verdict = "storage OK after the repair" if bad or lock_age or stuck else "storage OK: nothing to repair"
    return storage_verdict(config, len(bad) - fixed, verdict)


def journal_file(config):
    """The study's journal file, when it uses the default storage."""
    saved = run_dir(config) / "storage_url"
    if storage_url(config) or saved.exists():
        print("storage: not the journal file: only trials without a worker are checked")
        return None
    return run_dir(config) / "journal.log"


def report_journal(path):
    if not path.exists():
        return []  # open_existing_study says there is no study
    ops, bad = journal.scan(path)
    print(f"journal {path}: {ops} ops, {len(bad)} bad line(s)")
    for entry in bad:
        print(f"  line {entry.line} (byte {entry.offset}): {entry.problem}")
    return bad


def stuck_trials(study, tasks):
    """RUNNING trials whose worker is gone, judged as the reconcile judges them (liveness.is_dead)."""
    stuck = [t for t in study.get_trials(deepcopy=False, states=(liveness.RUNNING,)) if liveness.is_dead(t, tasks)]
    for t in stuck:
        where = t.user_attrs.get("slurm_task") or f"pid {t.user_attrs.get('pid', '?')}"
        print(f"trial {t.number} RUNNING without a worker ({where} on {t.user_attrs.get('host', '?')} is gone)")
    return stuck


def live_workers(study, tasks):
    """What makes a rewrite unsafe: trials whose worker lives, and tasks SLURM still holds."""
    if tasks is None:
        return ["SLURM cannot be asked about the study's array jobs"]
    running = study.get_trials(deepcopy=False, states=(liveness.RUNNING,))
    alive = [
        f"trial {t.number} (pid {t.user_attrs.get('pid', '?')})" for t in running if not liveness.is_dead(t, tasks)
    ]
    return alive + [f"task {key} {state}" for key, (state, *_) in sorted(tasks.items()) if state not in liveness.GONE]


def rewrite_journal(path, study, tasks, n_bad):
    """Rewrite the journal without its bad lines if no worker lives; returns the problems it fixed."""
    alive = live_workers(study, tasks)
    if alive:
        print(
            f"journal not rewritten: workers alive ({', '.join(alive[:5])}); they skip the bad lines "
            "meanwhile: run --check_storage --repair again once the study is idle"
        )
        return 0
    try:
        kept = journal.rewrite(path)
    except journal.StudyInUse as e:
        print(f"journal not rewritten: {e}: run --check_storage --repair again once the study is idle")
        return 0
    print(f"journal rewritten without its {n_bad} bad line(s): {kept} ops kept, caches dropped")
    trials = journal.strict_read(path)
    print(f"Optuna's own reader reads it: {trials} trials")
    return n_bad


def storage_verdict(config, left, ok="storage OK"):
    if not left:
        print(ok)
        return 0
    which = quote_command(["--config", config.path, "--study_name", config["study"]["study_name"]])
    print(f"{left} problem(s) left; fix: {this_script()} {which} --check_storage --repair")
    return 1


# ---------------------------------------------------------------- best trial
def best_trial(study):
    """The best trial of a single-objective study; None before the first COMPLETE or with several objectives."""
    if len(study.directions) > 1:
        return None
    try:
        return study.best_trial
    except ValueError:
        return None


def export_best(study, config, path, number=None):
    """best_trial.yaml: a complete experiment YAML for retraining the best trial (or trial `number`),
    plus its results. With several objectives, the Pareto front: every member, each retrainable."""
    source = config.path
    if number is not None:
        chosen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
        if chosen is None or chosen.state.name != "COMPLETE":
            raise ConfigError(source, "--trial", f"trial {number} is no COMPLETE trial", "name a COMPLETE trial")
        members = [chosen]
    else:
        members = [best_trial(study)] if len(study.directions) == 1 else study.best_trials
    if not members or members[0] is None:
        raise ConfigError(source, "study", "no COMPLETE trial yet", "wait for a trial to finish")
    target = export_target(config, path, number, study.study_name)
    if len(members) == 1 and (number is not None or len(study.directions) == 1):
        exported = retrainable(study, config, members[0], target.with_suffix(".pt"))
        retrain = "python worker.py --config {target}"
    else:
        front = [retrainable(study, config, t, target.with_suffix(f".{t.number}.pt")) for t in members]
        exported = {"pareto_front": front}
        retrain = 'make best ARGS="--trial <number>", then python worker.py --config trial_<number>.yaml'
    which = "Best trial(s)" if number is None else f"Trial {number}"
    header = (
        f"# {which} of study {study.study_name}: the full resolved config (base YAML + sampled params +\n"
        f"# derived dimensions). Retrain: {retrain.format(target=target)}\n"
    )
    write_export(target, header + yaml.safe_dump(exported, sort_keys=False))
    shown = ", ".join(f"{t.number} ({values_text(config, t.values)})" for t in members[:5])
    what = "best trial" if number is None else "trial"
    print(f"{what if len(members) == 1 else f'{len(members)} Pareto-optimal trials'} {shown} -> {target}")
    checkpoints.clean(study, config)
    return 0


def retrainable(study, config, trial, weights_target):
    """One trial as an experiment YAML that retrains it (a new study of one trial), with its results."""
    trained = Path(trial.user_attrs.get("config_path", "-"))
    # The config the trial trained with; if its file is gone, today's YAML with the trial's params.
    if trained.is_file():
        resolved = read_yaml(trained.read_text())
    else:  # a plain objective's params are suggested by the objective again (best_trial.params)
        resolved = copy.deepcopy(dict(config)) if config["study"]["objective"] else resolve_config(config, trial.params)
    resolved.pop("best_trial", None)  # the trial may itself be a retrain of an export
    resolved["study"].update(
        study_name=f"{study.study_name}_best{trial.number}", n_trials=1, storage=None, pruner={"name": "NopPruner"}
    )
    if config["study"]["objective"]:  # the objective suggests its own params; the export names no trainer
        resolved["study"].pop("trainer", None)
        resolved.pop("search_space", None)
    else:
        resolved["search_space"] = {}
    results = {
        "study_name": study.study_name,
        "number": trial.number,
        "metric": config["study"]["optimization_metric"],
        "direction": config["study"]["optimization_direction"],
        "value": trial.values if len(trial.values) > 1 else trial.value,
        "params": trial.params,
        "metrics": trial.user_attrs.get("metrics", {}),
        "weights": export_weights(config, trial, weights_target),
        "exported_at": now(),
    }
    return {"best_trial": copy.deepcopy(results), **resolved}  # copies: the front's members share no YAML anchors


def export_target(config, path, number, study_name):
    target = Path(path or config.dir)
    if target.is_dir() or path.endswith("/") or not path:
        name = "best_trial" if number is None else f"trial_{number}"
        target = target / f"{name}.yaml"
        if exported_study(target) not in (None, study_name):  # another study's export, from the same folder
            target = target.with_name(f"{name}_{study_name}.yaml")
    return target


def exported_study(target):
    """The study an earlier export at target came from (its first line says), else None."""
    try:
        with open(target) as f:
            match = re.match(r"# .* of study (\S+):", f.readline())
    except OSError:
        return None
    return match.group(1) if match else None


def write_export(target, text):
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError as e:
        raise cannot_write(target, e) from None


def cannot_write(target, error):
    return ConfigError(str(target), "--export_best", f"cannot write it ({error.strerror})", "name a writable path")


def export_weights(config, trial, target):
    """best_trial.pt beside best_trial.yaml: the trial's saved weights, else its last checkpoint."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        source = checkpoints.export_weights(config, trial.number, target)
    except OSError as e:
        raise cannot_write(target, e) from None
    if source is None:
        print(f"trial {trial.number} left no weights.pt nor checkpoint.pt: only its config is exported")
        return None
    print(f"trial {trial.number}'s {source.name} -> {target}")
    return str(target)


if __name__ == "__main__":
    sys.exit(main())
