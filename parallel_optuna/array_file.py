"""The array file: array_job.sbatch rendered for a study, and the sbatch commands that submit it."""

import math
import os
import sys

from parallel_optuna import PROJECT, slurm, study_control
from parallel_optuna import attributes as attr
from parallel_optuna.options import (
    OPTIONS,
)
from parallel_optuna.run_dir import run_dir, run_subdir, trusted_run_dir
from parallel_optuna.slurm import quote_command
from parallel_optuna.study import now

TEMPLATE = PROJECT / "array_job.sbatch"


def sbatch_directives(slurm_keys):
    lines = [
        f"#SBATCH {o.sbatch.format(slurm_keys[o.key])}"
        for o in OPTIONS
        if o.sbatch and slurm_keys.get(o.key) is not None
    ]
    if slurm_keys["nodes_per_trial"] > 1:
        lines.append(f"#SBATCH --nodes={slurm_keys['nodes_per_trial']}")
    if slurm_keys["gpus_per_task"]:
        gpus = (
            f"{slurm_keys['gpu_type']}:{slurm_keys['gpus_per_task']}"
            if slurm_keys["gpu_type"]
            else slurm_keys["gpus_per_task"]
        )
        per = "-per-task" if slurm_keys["tasks_per_trial"] > 1 else ""  # several processes: each its own GPUs
        lines.append(f"#SBATCH --gpus{per}={gpus}")
    lines += [f"#SBATCH {d}" for d in slurm_keys["extra_directives"]]
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
    folder, slurm_keys = run_dir(config), config["slurm"]
    run_subdir(config, "slurm_logs")
    python = "python" if slurm_keys["setup"] else sys.executable  # setup lines bring their own environment
    trials = slurm_keys["trials_per_task"]
    command = [python, PROJECT / "worker.py", *worker_flags(config, storage_file), "--trials", str(trials)]
    command = rank_launcher(slurm_keys) + command
    script = folder / "array_job.sbatch"
    script.write_text(
        TEMPLATE.read_text().format(
            study_name=config["study"]["study_name"],
            script=script,
            job_name=study_control.job_name(config["study"]["study_name"]),
            array=f"0-{n_tasks - 1}%{slurm_keys['max_concurrent_jobs']}",
            log_dir=folder / "slurm_logs",
            signal_grace=slurm_keys["signal_grace"],
            ntasks=slurm_keys["tasks_per_trial"],
            term_to_worker=TERM_TO_WORKER[slurm_keys["tasks_per_trial"] > 1],
            directives=sbatch_directives(slurm_keys),
            setup="\n".join(slurm_keys["setup"]) or "# (none)",
            pythonpath=pythonpath_line(),
            workdir=quote_command([os.getcwd()]),
            worker_command=quote_command(command + (["--data_dir", data_dir] if data_dir else [])),
        )
    )
    return script


def rank_launcher(slurm_keys):
    """slurm.tasks_per_trial > 1: srun starts one worker per process; a process that dies ends them all
    (ranks.py). Each rank sees all of its node's GPUs of the job, as under torchrun, and picks its own
    by LOCAL_RANK."""
    if slurm_keys["tasks_per_trial"] == 1:
        return []
    gpus = ["--gpu-bind=none"] if slurm_keys["gpus_per_task"] else []
    return ["srun", "--kill-on-bad-exit=1", f"--cpus-per-task={slurm_keys['cpus_per_task']}", *gpus]


# On TERM srun ends its step at once (SIGKILL), before any rank checkpoints; it passes USR1 to every rank,
# which takes it as TERM (trial_handle.SRUN_TERM). A job's end (scancel, preemption, walltime) TERMs the ranks
# themselves, not srun (docs/multi_gpu.md).
TERM_TO_WORKER = {False: "TERM", True: "USR1"}


def pythonpath_line():
    """The array tasks import the user's code with the PYTHONPATH of the submission."""
    path = os.environ.get("PYTHONPATH")
    return f"export PYTHONPATH={quote_command([path])}" if path else "# (PYTHONPATH was not set at submit time)"


DEPENDENCY = "--dependency=afterany:"


def array_size(missing, trials_per_task, throttle):
    """Tasks for `missing` trials, packed `trials_per_task` to a task, but never fewer than %K can run at once."""
    return max(math.ceil(missing / trials_per_task), min(missing, throttle))


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
    jobs = list(study.user_attrs.get(attr.ARRAY_JOBS, []))
    previous = None
    for tasks, command in commands:
        command = [word + previous if word == DEPENDENCY else word for word in command]
        result = slurm.sbatch(command)
        if result.returncode != 0 and previous is None and "dependency" in result.stderr.lower():
            command = [word for word in command if not word.startswith(DEPENDENCY)]  # those arrays just ended
            result = slurm.sbatch(command)
        if result.returncode != 0:
            print(f"error: {quote_command(command)} failed: {refusal(result.stderr)}", file=sys.stderr)
            return 1
        previous = result.stdout.strip().split(";")[0]
        jobs.append({"job_id": previous, "tasks": tasks, "submitted_at": now()})
        study.set_user_attr(attr.ARRAY_JOBS, jobs)
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


# What sbatch names a submit limit by, and the limit's name in sacctmgr.
SUBMIT_LIMITS = {
    "AssocMaxSubmitJobLimit": "your association's MaxSubmitJobs",
    "AssocGrpSubmitJobsLimit": "your account's GrpSubmitJobs",
    "QOSMaxSubmitJobPerUserLimit": "the QOS's MaxSubmitJobsPerUser",
    "QOSMaxSubmitJobPerAccountLimit": "the QOS's MaxSubmitJobsPerAccount",
    "QOSGrpSubmitJobsLimit": "the QOS's GrpSubmitJobs",
}


def refusal(stderr):
    """sbatch's refusal in one line; a submit limit by its name, with the fix."""
    said = " ".join(line.removeprefix("sbatch: error: ") for line in stderr.strip().splitlines())
    limit = next((name for reason, name in SUBMIT_LIMITS.items() if reason in stderr), None)
    if limit:
        return f"{limit} is full ({said}); fix: submit again once some of your jobs have ended, or ask for fewer"
    return said


def this_script():
    """This script as a command that runs from any folder, without an activated virtual environment."""
    return quote_command([sys.executable, PROJECT / "submit_study.py"])
