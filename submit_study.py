"""Create (or load) an Optuna study and run it as a SLURM job array, one trial per task.

    python submit_study.py --exp_id baseline_LSTM_ishigami_cat      # submit: experiments/<id>/config.yaml
    python submit_study.py --config config.example.yaml --no-submit_jobs   # dry run: write and print
    python submit_study.py --config config.example.yaml --local 2   # no SLURM: 2 worker processes here
    python submit_study.py --config config.example.yaml --status    # trials, budget, best, SLURM tasks
    python submit_study.py --config config.example.yaml --export_best   # best_trial.yaml

Submitting again with the same study name resumes the study: the array asks only for the trials
still missing (n_trials - finished - running), so a re-submission tops up what was lost and a larger
--n_trials extends a finished study. Every study/slurm key of the YAML has a flag of the same name.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import yaml

import liveness
from experiment import (
    FINISHED,
    OPTIONS,
    ConfigError,
    add_experiment_flags,
    build_pruner,
    build_sampler,
    config_from_args,
    count_states,
    load_trainer,
    mask_password,
    open_storage,
    open_study,
    prepare_data,
    quote_command,
    run_dir,
    storage_url,
)

PROJECT = Path(__file__).resolve().parent
TEMPLATE = PROJECT / "array_job.sbatch"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    parser.add_argument(
        "--export_best",
        nargs="?",
        const="",
        metavar="PATH",
        help="write the best trial (default: best_trial.yaml beside the experiment YAML)",
    )
    return parser.parse_args(argv)


def main(argv=None):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    args = parse_args(argv)
    try:
        config = config_from_args(args)
        if args.status:
            return show_status(open_existing_study(config), config)
        if args.export_best is not None:
            return export_best(open_existing_study(config), config, args.export_best)
        return submit(args, config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------- submit
def submit(args, config):
    source = config["config_path"]
    # Everything that can be wrong is checked before a file is written or a study created.
    load_trainer(config, source)
    build_sampler(config, 0, source), build_pruner(config, source)
    if args.local is not None and args.local < 1:
        raise ConfigError("--local", "local", f"{args.local} workers", "pass --local 1 or more")
    if args.submit_jobs and args.local is None and not shutil.which("sbatch"):
        raise ConfigError(
            "sbatch",
            "(command)",
            "sbatch is not on PATH",
            "run on a SLURM login node, or use --local K or --no-submit_jobs",
        )
    url = storage_url(config)
    storage = open_storage(config, url, source) if url else None  # an unreachable server fails first
    prepare_data(config, source)
    storage = storage or open_storage(config, None, source)  # the journal file, once all checks passed
    data_dir = stage_data(config, args.scratch) if args.cluster else None
    if args.group_access:
        run_dir(config).chmod(0o750)

    study = open_study(config, storage, 0, source)
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
    study.set_user_attr("n_trials", config["study"]["n_trials"])  # the budget status reports against
    failed = liveness.reconcile(study, config)
    if failed:
        print(f"trials {failed} had lost their workers: failed and re-enqueued")

    if args.local is not None:
        return run_local(args, config, study)
    missing = remaining(study, config)
    script = write_array_file(config, missing or 1, data_dir, url)
    if missing == 0:
        print(
            f"budget met: {config['study']['n_trials']} trials finished or running; nothing to submit "
            f"(raise --n_trials to extend the study)"
        )
        return 0
    max_size = max_array_size() if args.submit_jobs else 1001
    commands = sbatch_commands(script, missing, max_size, config["slurm"]["max_concurrent_jobs"])
    if not args.submit_jobs:
        print(script.read_text())
        shown = [quote_command(c).replace("{previous}", "<previous job id>") for _, c in commands]
        print("dry run, nothing submitted; to submit:\n  " + "\n  ".join(shown))
        return 0
    return submit_arrays(study, config, commands)


def remaining(study, config):
    """Trials still to run: the budget less those finished or running (WAITING retries are in it)."""
    counts = count_states(study.get_trials(deepcopy=False))
    finished = counts["COMPLETE"] + counts["PRUNED"]
    return max(0, config["study"]["n_trials"] - finished - counts["RUNNING"])


def stage_data(config, scratch):
    scratch = scratch or os.environ.get("SCRATCH")
    if not scratch:
        raise ConfigError(
            config["config_path"],
            "slurm.scratch",
            "--cluster needs a scratch directory",
            "set $SCRATCH, pass --scratch DIR or set slurm.scratch",
        )
    source = (config.get("data") or {}).get("dir")
    if not source:
        raise ConfigError(
            config["config_path"],
            "data.dir",
            "--cluster stages data.dir, which is not set",
            "set data.dir to the experiment's data directory",
        )
    target = Path(scratch).expanduser() / config["study"]["study_name"] / "data"
    shutil.copytree(source, target, dirs_exist_ok=True)
    print(f"data staged: {source} -> {target}")
    return target


# ---------------------------------------------------------------- the array file
def sbatch_directives(slurm):
    lines = [f"#SBATCH {o.sbatch.format(slurm[o.key])}" for o in OPTIONS if o.sbatch and slurm.get(o.key) is not None]
    if slurm["gpus_per_task"]:
        gpus = f"{slurm['gpu_type']}:{slurm['gpus_per_task']}" if slurm["gpu_type"] else slurm["gpus_per_task"]
        lines.append(f"#SBATCH --gpus={gpus}")
    lines += [f"#SBATCH {d}" for d in slurm["extra_directives"]]
    return "\n".join(lines)


def worker_command(config, data_dir, storage_file):
    python = "python" if config["slurm"]["setup"] else sys.executable  # setup lines bring their own env
    command = [python, PROJECT / "worker.py", "--config", config["config_path"], "--trials", "1"]
    for option in OPTIONS:  # the workers see the same budget, metric, ... as this submission
        if option.section == "study" and option.key in config["cli_overrides"] and option.key != "storage":
            command += [f"--{option.key}", config["study"][option.key]]
    if data_dir:
        command += ["--data_dir", data_dir]
    if storage_file:
        command += ["--storage_file", storage_file]
    return quote_command(command)


def write_array_file(config, n_tasks, data_dir, url):
    folder, slurm = run_dir(config), config["slurm"]
    (folder / "slurm_logs").mkdir(parents=True, exist_ok=True)
    storage_file = None
    if url and (not config["study"]["storage"] or "storage" in config["cli_overrides"]):
        # A URL from the environment or the command line may hold a password: pass it by reference.
        storage_file = folder / "storage_url"
        storage_file.touch(mode=0o600)
        storage_file.write_text(url + "\n")
    script = folder / "array_job.sbatch"
    script.write_text(
        TEMPLATE.read_text().format(
            study_name=config["study"]["study_name"],
            script=script,
            job_name=f"optuna_{config['study']['study_name']}",
            array=f"0-{n_tasks - 1}%{slurm['max_concurrent_jobs']}",
            log_dir=folder / "slurm_logs",
            signal_grace=slurm["signal_grace"],
            directives=sbatch_directives(slurm),
            setup="\n".join(slurm["setup"]) or "# (none)",
            workdir=quote_command([os.getcwd()]),
            worker_command=worker_command(config, data_dir, storage_file),
        )
    )
    return script


def max_array_size():
    """Array indexes must stay below the cluster's MaxArraySize (default 1001)."""
    out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True)
    match = re.search(r"^MaxArraySize\s*=\s*(\d+)", out.stdout, re.MULTILINE)
    return int(match.group(1)) if match else 1001


def sbatch_commands(script, n_tasks, max_size, throttle):
    """One sbatch per chunk of at most MaxArraySize tasks, each chunk waiting for the one before so %K holds.

    Returns (tasks, command) pairs; DEPENDENCY stands for the previous chunk's job id.
    """
    sizes = [min(max_size, n_tasks - start) for start in range(0, n_tasks, max_size)]
    return [
        (size, ["sbatch", "--parsable", *([DEPENDENCY] if i else []), f"--array=0-{size - 1}%{throttle}", str(script)])
        for i, size in enumerate(sizes)
    ]


DEPENDENCY = "--dependency=afterany:{previous}"


def submit_arrays(study, config, commands):
    jobs = list(study.user_attrs.get("array_jobs", []))
    previous = None
    for tasks, command in commands:
        command = [word.format(previous=previous) for word in command]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            print(f"error: {quote_command(command)} failed: {result.stderr.strip()}", file=sys.stderr)
            return 1
        previous = result.stdout.strip().split(";")[0]
        jobs.append({"job_id": previous, "tasks": tasks, "submitted_at": now()})
        study.set_user_attr("array_jobs", jobs)
        print(f"submitted array job {previous}: {tasks} tasks")
    folder = run_dir(config)
    which = quote_command(["--config", config["config_path"], "--study_name", config["study"]["study_name"]])
    print(
        "watch it:\n"
        f"  squeue --me --array --jobs={','.join(j['job_id'] for j in jobs[-len(commands) :])}\n"
        f"  python submit_study.py {which} --status\n"
        f"  tail -f {folder}/slurm_logs/optuna_{previous}_*.out"
    )
    return 0


# ---------------------------------------------------------------- local workers
def run_local(args, config, study):
    """K worker processes on this machine, each running trials until the budget is met."""
    command = [sys.executable, str(PROJECT / "worker.py"), "--config", config["config_path"], "--trials", "0"]
    for key, value in config["cli_overrides"].items():
        if key in {o.key for o in OPTIONS if o.section == "study"}:
            command += [f"--{key}", str(value)]
    print(f"running {args.local} local workers: {quote_command(command)}")
    workers = [subprocess.Popen(command + ["--seed_offset", str(i)]) for i in range(args.local)]
    codes = [w.wait() for w in workers]
    show_status(study, config)
    if any(s in FINISHED for s in (t.state for t in study.get_trials(deepcopy=False))):
        export_best(study, config, "")
    return 0 if all(c in (0, 1) for c in codes) else 1


# ---------------------------------------------------------------- status
def open_existing_study(config):
    storage = open_storage(config, storage_url(config), config["config_path"])
    name = config["study"]["study_name"]
    if name not in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
        raise ConfigError(
            config["config_path"],
            "study.study_name",
            f"no study {name!r} in the storage",
            "submit it first, or pass the --study_name it was submitted with",
        )
    return optuna.load_study(study_name=name, storage=storage)


def show_status(study, config):
    if "n_trials" not in config["cli_overrides"]:  # the budget of the last submission, if the YAML differs
        config["study"]["n_trials"] = study.user_attrs.get("n_trials", config["study"]["n_trials"])
    tasks = liveness.squeue_tasks()
    liveness.reconcile(study, config, tasks)
    trials = study.get_trials(deepcopy=False)
    counts = count_states(trials)
    budget = config["study"]["n_trials"]
    finished = counts["COMPLETE"] + counts["PRUNED"]
    print(f"study {study.study_name}: " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"progress {progress_bar(finished, budget)} {finished}/{budget} finished")
    best = best_trial(study)
    if best:
        metric = config["study"]["optimization_metric"]
        print(f"best: trial {best.number}  {metric} = {best.value:.6g}  params {best.params}")
    running = [t for t in trials if t.state == liveness.RUNNING]
    if running:
        print("running:")
    for t in running:
        a = t.user_attrs
        where = f"  task {a['slurm_task']}" if a.get("slurm_task") else ""
        age = duration(trial_seconds(t))
        print(f"  trial {t.number}  host {a.get('host', '?')}  pid {a.get('pid', '?')}  age {age}{where}")
    failed = [t for t in trials if t.state.name == "FAIL"]
    for t in failed[-10:]:
        reason = t.user_attrs.get("fail_reason", "no heartbeat within grace_period (worker died)")
        print(f"  trial {t.number} FAIL: {reason}")
    live_tasks = 0
    if study.user_attrs.get("array_jobs"):
        live_tasks = print_slurm_tasks(study, trials, tasks)
    missing = remaining(study, config) - live_tasks
    if missing > 0:
        print(f"{missing} trial(s) not covered by any worker: submit again to top up")
    return 0


def print_slurm_tasks(study, trials, tasks):
    """One line per array task and trial: SLURM's view (one squeue, at most one sacct) joined with the study.

    Returns how many of the study's tasks are still pending or running.
    """
    job_ids = [j["job_id"] for j in study.user_attrs["array_jobs"]]
    live = {k: v[0] for k, v in (tasks or {}).items() if k.split("_")[0] in job_ids}
    states = {**sacct_states(job_ids), **live}
    by_task = {}
    for t in trials:
        if t.user_attrs.get("slurm_task", "").split("_")[0] in job_ids:
            by_task.setdefault(t.user_attrs["slurm_task"], []).append(t)
    print(f"{'array task':<14}{'slurm':<12}{'trial':>6}  {'state':<9}{'value':>12}  {'elapsed':>9}  log")
    for key in sorted(set(states) | set(by_task), key=task_order):
        for t in by_task.get(key) or [None]:
            value = f"{t.value:.6g}" if t and t.value is not None else "-"
            elapsed = duration(trial_seconds(t)) if t else "-"
            print(
                f"{key:<14}{states.get(key, 'ended'):<12}{t.number if t else '-':>6}  {t.state.name if t else '-':<9}"
                f"{value:>12}  {elapsed:>9}  {t.user_attrs.get('slurm_out', '-') if t else '-'}"
            )
    return sum(1 for key in live if key not in by_task)


def sacct_states(job_ids):
    """Finished tasks' states from one sacct call; {} where accounting is off."""
    if not shutil.which("sacct"):
        return {}
    out = subprocess.run(
        ["sacct", "--noheader", "--parsable2", "--allocations", f"--jobs={','.join(job_ids)}", "--format=JobID,State"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        return {}
    return dict(line.split("|")[:2] for line in out.stdout.splitlines() if "|" in line)


def trial_seconds(trial):
    """Training time of a finished trial; time since the start of a running one."""
    if trial.state == liveness.RUNNING and trial.datetime_start:
        return (datetime.now() - trial.datetime_start).total_seconds()
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


# ---------------------------------------------------------------- best trial
def best_trial(study):
    try:
        return study.best_trial
    except ValueError:
        return None


def export_best(study, config, path):
    """best_trial.yaml: a complete experiment YAML for retraining the best trial, plus its results."""
    best = best_trial(study)
    if best is None:
        raise ConfigError(config["config_path"], "study", "no COMPLETE trial yet", "wait for a trial to finish")
    resolved = yaml.safe_load(Path(best.user_attrs["config_path"]).read_text())
    for key in ("experiment_dir", "config_path", "cli_overrides"):
        resolved.pop(key, None)
    resolved["study"].update(
        study_name=f"{study.study_name}_best{best.number}", n_trials=1, storage=None, pruner={"name": "NopPruner"}
    )
    resolved["search_space"] = {}
    exported = {
        "best_trial": {
            "study_name": study.study_name,
            "number": best.number,
            "metric": config["study"]["optimization_metric"],
            "direction": config["study"]["optimization_direction"],
            "value": best.value,
            "params": best.params,
            "metrics": best.user_attrs.get("metrics", {}),
            "exported_at": now(),
        },
        **resolved,
    }
    target = Path(path) if path else Path(config["experiment_dir"]) / "best_trial.yaml"
    header = (
        f"# Best trial of study {study.study_name}: the full resolved config (base YAML + sampled params +\n"
        f"# derived dimensions). Retrain it: python worker.py --config {target}\n"
    )
    target.write_text(header + yaml.safe_dump(exported, sort_keys=False))
    print(f"best trial {best.number} ({config['study']['optimization_metric']} = {best.value:.6g}) -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
