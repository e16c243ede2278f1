"""Control a running study: throttle, pause, resume and cancel every one of its array tasks.

    python submit_study.py --config exp.yaml --throttle 2    # at most 2 tasks at once, from now on
    python submit_study.py --config exp.yaml --pause         # queued tasks held; no new trial starts
    python submit_study.py --config exp.yaml --resume        # released
    python submit_study.py --config exp.yaml --cancel        # stop now; trials end FAIL "cancelled"

A study's arrays are those it recorded when it submitted them (user attr `array_jobs`) and any
still queued under the array file's job name `optuna_<study>` (arrays submitted by hand with
`sbatch` on the rendered file). The study keeps two marks as user attrs: `control` ("paused" or
"cancelled") and `max_concurrent_jobs` (the last throttle). Workers read `control` before they
claim a trial (hold_back); a resubmission clears "cancelled" and continues the stopped trials
from their checkpoints as linked retries (resume_stopped).

Status helpers live here too: an ETA from finished-trial durations, and each running trial's last
reported step, read from the tail of its worker.log.
"""

import logging
import re
import time
from datetime import datetime
from pathlib import Path

import optuna

from parallel_optuna import attributes as attr
from parallel_optuna import liveness, retries, slurm
from parallel_optuna.study import FINISHED, still_to_run

log = logging.getLogger("control")
FAIL = optuna.trial.TrialState.FAIL
WAITING = optuna.trial.TrialState.WAITING
PAUSED, CANCELLED = "paused", "cancelled"
STOPPED_REASONS = ("cancelled", "interrupted by ")  # fail reasons of trials stopped on purpose


# ---------------------------------------------------------------- the study's arrays
def job_name(study_name):
    return f"optuna_{study_name}"  # the array file's --job-name (submit_study.write_array_file)


def submit_job_name(study_name):
    return f"optuna_submit_{study_name}"  # the job of --as_job, which submits the study's array


def queued_arrays(study):
    """{array job id: [(task, state, reason)]} of the study's arrays that SLURM still holds."""
    recorded = {j["job_id"] for j in study.user_attrs.get(attr.ARRAY_JOBS, [])}
    recorded |= liveness.running_jobs(study.get_trials(deepcopy=False))
    rows = slurm.squeue(f"--name={job_name(study.study_name)}", "--me")
    if recorded:
        rows += slurm.squeue(f"--jobs={','.join(sorted(recorded))}")
    arrays = {}
    for array, task, state, reason in set(map(tuple, rows)):
        arrays.setdefault(array, []).append((task, state, reason))
    return arrays


def throttle(study, k):
    """At most k tasks of each array at once, from now on; the study records k for later submissions."""
    study.set_user_attr(attr.MAX_CONCURRENT_JOBS, k)
    arrays = queued_arrays(study)
    for array in sorted(arrays):
        slurm.run(["scontrol", "update", f"JobId={array}", f"ArrayTaskThrottle={k}"])
    print(f"study {study.study_name}: at most {k} tasks at once ({describe(arrays)})")
    return 0


def pause(study):
    """Hold the queued tasks; running trials finish, and workers claim no new trial until resume."""
    study.set_user_attr(attr.CONTROL, PAUSED)
    arrays = queued_arrays(study)
    pending = tasks_where(arrays, lambda state, reason: state == "PENDING")
    if pending:
        slurm.run(["scontrol", "hold", ",".join(pending)])
    running = sum(state == "RUNNING" for tasks in arrays.values() for _, state, _ in tasks)
    print(
        f"study {study.study_name}: paused ({describe(arrays)}): {len(pending)} queued task(s) held, "
        f"{running} running task(s) finish their trial"
    )
    return 0


def resume(study):
    study.set_user_attr(attr.CONTROL, None)
    arrays = queued_arrays(study)
    held = tasks_where(arrays, lambda state, reason: state == "PENDING" and "held" in reason.lower())
    if held:
        slurm.run(["scontrol", "release", ",".join(held)])
    print(f"study {study.study_name}: resumed ({describe(arrays)}): {len(held)} held task(s) released")
    return 0


def cancel(study):
    """Stop now: marked first, so that workers fail their trials as "cancelled" after checkpointing.

    Queued tasks are cancelled. Running ones get SIGTERM in their batch shell, which forwards it to
    the worker (to srun as USR1, with several processes per trial): the trainer ends at its next
    save_checkpoint(), however long the epoch. A plain
    scancel would SIGKILL it KillWait seconds (often 30) after the SIGTERM, mid-epoch, unsaved. A
    second cancel does that: for a worker that does not come to a stop.
    """
    again = mark(study) == CANCELLED
    study.set_user_attr(attr.CONTROL, CANCELLED)
    arrays = queued_arrays(study)
    if arrays and again:
        slurm.run(["scancel", *sorted(arrays)])  # SIGTERM, SIGKILL after KillWait
    elif arrays:
        # A task may end between the squeue that listed it and these: that is no failure of the cancel.
        slurm.run(["scancel", "--state=PENDING", *sorted(arrays)], ok_if="Invalid job id")
        slurm.run(["scancel", "--state=RUNNING", "--batch", "--signal=TERM", *sorted(arrays)], ok_if="Invalid job id")
    # A submit job still queued (--as_job) would submit again, and a submit resumes the study.
    submitters = sorted({row[0] for row in slurm.squeue(f"--name={submit_job_name(study.study_name)}", "--me")})
    if submitters:
        slurm.run(["scancel", *submitters])
    study.set_user_attr(attr.NEXT_PART, None)  # a chained next part is among them: a submit decides anew
    print(
        f"study {study.study_name}: cancelled ({describe(arrays)}"
        + (f"; submit job(s) {', '.join(submitters)} cancelled too" if submitters else "")
        + (
            "); running tasks end now"
            if again
            else "); running trials checkpoint at their next save_checkpoint() and end as FAIL 'cancelled' "
            "(--cancel again: end them at once)"
        )
        + "; submit again to continue them"
    )
    return 0


def tasks_where(arrays, condition):
    """The array tasks (`<array>_<task>`) whose squeue state and reason meet the condition."""
    return sorted(task for tasks in arrays.values() for task, state, reason in tasks if condition(state, reason))


def describe(arrays):
    if not arrays:
        return "no array of it is queued or running"
    tasks = sum(len(t) for t in arrays.values())
    return f"{tasks} task(s) of array(s) {', '.join(sorted(arrays))}"


def mark(study):
    return study.user_attrs.get(attr.CONTROL)


# ---------------------------------------------------------------- the worker's side
def hold_back(study):
    """True when the study is paused or cancelled: the worker claims no trial.

    A paused array task that started anyway (it was not queued yet when the study was paused) goes
    back to the queue, held, so that resume runs it: no task is lost to a pause.
    """
    state = mark(study)
    if not state:
        return False
    task = liveness.slurm_task_key()
    if state == PAUSED and task:
        try:
            slurm.run(["scontrol", "requeuehold", task])
        except slurm.SlurmError as e:
            log.warning("study paused; task %s ends without a trial (%s)", task, e)
    log.info("study %s is %s: no new trial claimed", study.study_name, state)
    return True


def stop_reason(study, signal_name):
    """Why a checkpointed trial ends FAIL when its worker is stopped: cancelled, or interrupted by hand."""
    return "cancelled" if mark(study) == CANCELLED else f"interrupted by {signal_name}"


# ---------------------------------------------------------------- resubmission
def resume_stopped(study, n_trials):
    """Clear "cancelled"; retry each trial stopped on purpose once, linked, from its checkpoint.

    Returns the numbers of the trials retried. A stop is not the trial's fault: its retry count stays.
    """
    if mark(study) == CANCELLED:
        study.set_user_attr(attr.CONTROL, None)
    trials = study.get_trials(deepcopy=False)
    retried = {retries.replaced(t) for t in trials}
    stopped = [
        t
        for t in trials
        if t.state == FAIL
        and t.number not in retried
        and t.user_attrs.get(attr.FAIL_REASON, "").startswith(STOPPED_REASONS)
    ]
    waiting = sum(t.state == WAITING for t in trials)
    chosen = stopped[: max(0, still_to_run(trials, n_trials) - waiting)]
    for trial in chosen:
        retries.enqueue(study, trial, trial.user_attrs.get(attr.RETRY_ATTEMPT, 0))
    return [t.number for t in chosen]


# ---------------------------------------------------------------- progress for status
STEP_LINE = re.compile(r"^(\S+ \S+) INFO worker: trial \d+ step (\d+): (\S+)")


def last_step(log_path, tail_bytes=4096):
    """(step, value, when) of the last step in a trial's worker.log, reading only its tail; None if none."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, Path(log_path).stat().st_size - tail_bytes))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        match = STEP_LINE.match(line)
        if match:
            when = datetime.strptime(match.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S")
            return int(match.group(2)), match.group(3), when
    return None


def eta_seconds(trials, budget, concurrency, now=None):
    """Seconds until the budget is met: the mean finished-trial time over the work left, `concurrency` at once.

    None until a trial has finished.
    """
    finished = [t for t in trials if t.state in FINISHED]
    durations = [t.user_attrs[attr.TRAIN_SECONDS] for t in finished if attr.TRAIN_SECONDS in t.user_attrs]
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    now = now or time.time()
    running = [t for t in trials if t.state == liveness.RUNNING and t.datetime_start]
    started = sum(min(mean, now - t.datetime_start.timestamp()) for t in running)
    missing = max(0, budget - len(finished))
    return max(0.0, missing * mean - started) / max(1, min(concurrency, missing))


def study_jobs(study):
    """The study's array jobs: those it submitted and those of trials still RUNNING (hand-submitted ones)."""
    submitted = {j["job_id"] for j in study.user_attrs.get(attr.ARRAY_JOBS, [])}
    return submitted | liveness.running_jobs(study.get_trials(deepcopy=False))


def queued_tasks(study, tasks):
    """The study's array tasks that SLURM still holds but that have not taken a trial yet."""
    taken = {t.user_attrs.get(attr.SLURM_TASK) for t in study.get_trials(deepcopy=False) if t.state == liveness.RUNNING}
    return sum(1 for key in tasks or {} if key not in taken)
