"""Which RUNNING trials still have a live worker, and what happens to those that do not.

SLURM is the source of truth for liveness: a trial records its array task (`<arrayjob>_<task>`),
and one `squeue` call lists every task that still exists. A trial whose task is gone is dead.
Local trials (no SLURM) record host, pid and the pid's start time instead.

A dead trial is marked FAIL with the reason and retried with the same params, the retry linked
to it as Optuna links its own (retries.py).
Whoever manages to fail the trial enqueues the retry; on the journal storage exactly one of two
racing processes can, so a dead trial is retried once. Optuna's SQLite storage lets both succeed,
which is why worker.py also drops a second retry of the same trial when it is asked.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING

import optuna
from optuna.trial import FrozenTrial

from parallel_optuna import attributes as attr
from parallel_optuna import retries, slurm, task_ends
from parallel_optuna.slurm import hostname
from parallel_optuna.storage import optuna_internals
from parallel_optuna.study import still_to_run, study_budget

if TYPE_CHECKING:  # names for the hints only: importing them would make a cycle
    from parallel_optuna.config import Config

log = logging.getLogger("liveness")
RUNNING = optuna.trial.TrialState.RUNNING
WAITING = optuna.trial.TrialState.WAITING
# A worker killed between ask() and recording who it is leaves a RUNNING trial without owner.
UNOWNED_GRACE_S = 600
GONE = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}


def slurm_task_key() -> str | None:
    """This process's array task, as squeue's %i prints it; None outside a job array.

    Only array tasks own one trial each: processes sharing an salloc or a plain job are told apart by pid.
    """
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else None


def running_jobs(trials: list[FrozenTrial]) -> set[str]:
    """The array jobs of the RUNNING trials: the only jobs liveness needs to ask SLURM about."""
    return {
        t.user_attrs[attr.SLURM_TASK].split("_")[0]
        for t in trials
        if t.state == RUNNING and t.user_attrs.get(attr.SLURM_TASK)
    }


class Tasks(dict):
    """{task key: (state, elapsed, reason)} from one squeue call, and the jobs that call asked about.

    Only a task of a job that was asked about can be judged gone: a trial claimed meanwhile by a task
    of another job (an array submitted by hand, or by a concurrent submit) is alive as far as we know.
    """

    def __init__(self, asked, tasks=()):
        super().__init__(tasks)
        self.asked = frozenset(asked)

    def gone(self, task):
        """Whether the array task `<job>_<task>` has certainly left SLURM (False when its job was not asked about)."""
        if task.split("_")[0] not in self.asked:
            return False
        return task not in self or self[task][0] in GONE


def squeue_tasks(job_ids: set[str]) -> Tasks | None:
    """The Tasks of these jobs, from one squeue call.

    Asked by job id, not by user, so a teammate's status sees your tasks too.
    None when SLURM cannot be asked: then nobody is declared dead.
    """
    if not job_ids:
        return Tasks(())
    rows = slurm.squeue_jobs(job_ids, fields="%i|%T|%M|%r")
    if rows is None:
        if slurm.available("squeue"):
            log.warning("squeue failed or gave no answer: liveness unknown, nobody is judged dead")
        return None
    tasks = Tasks(job_ids)  # a job asked about and absent has left the queue
    for key, state, elapsed, reason in rows:
        tasks[key] = (state, elapsed, reason)
    return tasks


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks, so a recycled pid is not mistaken for our worker.

    None when the process is gone, or a zombie (killed, not yet reaped by its parent).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    if not fields or fields[0] == "Z":
        return None
    return int(fields[19])


def is_dead(trial: FrozenTrial, tasks: Tasks | None, now: float | None = None) -> bool:
    attrs = trial.user_attrs
    task = attrs.get(attr.SLURM_TASK)
    if task:
        return tasks is not None and tasks.gone(task)
    if attrs.get(attr.HOST) is None:  # the worker records host last: until then the trial has no owner
        started = trial.datetime_start.timestamp() if trial.datetime_start else (now or time.time())
        return (now or time.time()) - started > UNOWNED_GRACE_S
    if attrs[attr.HOST] != hostname():
        return False  # another machine without SLURM: we cannot tell
    return process_start(attrs[attr.PID]) != attrs.get(attr.PID_START)  # None = no /proc: cannot tell


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, reason: str, max_retries: int, n_trials: int) -> bool:
    """Mark the trial FAIL with its reason; if we were the one to do so, enqueue one retry."""
    try:
        optuna_internals.live_trial(study, trial).set_user_attr(attr.FAIL_REASON, reason)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    except (RuntimeError, ValueError):
        return False  # another process finished it first: the retry is theirs
    log.warning("trial %d FAIL: %s", trial.number, reason)
    attempt = trial.user_attrs.get(attr.RETRY_ATTEMPT, 0)
    if attempt >= max_retries:
        log.warning("trial %d not retried: %d retries already (study.max_retries)", trial.number, attempt)
        return True
    trials = study.get_trials(deepcopy=False)
    if still_to_run(trials, n_trials) <= sum(t.state == WAITING for t in trials):
        return True  # finished, running and already waiting trials cover the budget
    retries.enqueue(study, trial, attempt + 1)
    log.warning("trial %d re-enqueued as a retry (attempt %d of %d)", trial.number, attempt + 1, max_retries)
    return True


def reconcile(study: optuna.Study, config: Config, tasks: Tasks | None | str = "ask") -> list[int]:
    """Fail and retry every RUNNING trial whose worker is gone. Returns the numbers it failed."""
    running = study.get_trials(deepcopy=False, states=(RUNNING,))
    if tasks == "ask":
        tasks = squeue_tasks(running_jobs(running))
    settings = config["study"]
    dead = [trial for trial in running if is_dead(trial, tasks)]
    tasks_gone = sorted({t.user_attrs[attr.SLURM_TASK] for t in dead if t.user_attrs.get(attr.SLURM_TASK)})
    ends = task_ends.latest(tasks_gone) if tasks_gone else {}  # sacct asked about the dead tasks only
    failed = []
    for trial in dead:
        reason = death_reason(trial, ends, tasks, config)
        if fail_and_retry(study, trial, reason, settings["max_retries"], study_budget(study, config)):
            failed.append(trial.number)
    return failed


def death_reason(trial: FrozenTrial, ends: dict[str, task_ends.TaskEnd], tasks: Tasks | None, config: Config) -> str:
    """Why the worker is gone: accounting's word on its task where SLURM killed it (OOM, walltime, node)."""
    task = trial.user_attrs.get(attr.SLURM_TASK)
    gone = f"{task or 'pid ' + str(trial.user_attrs.get(attr.PID))} on {trial.user_attrs.get(attr.HOST, '?')} is gone"
    end = ends.get(task) if task else None
    if end is None and task and tasks and task in tasks:  # no accounting: squeue's state, for a few minutes
        end = task_ends.TaskEnd(task, tasks[task][0])
    if end is None or not end.bad:
        return f"worker died: {gone}"
    return f"worker died: task {task}: {task_ends.why(end, trial, config)}"


def fail_stale(study: optuna.Study, config: Config) -> list[int]:
    """RDB storages: fail and retry every RUNNING trial whose heartbeat stopped. Returns the numbers it failed.

    Optuna finds the stale trials; failing and retrying goes through fail_and_retry, as for a task gone
    from squeue: the dead trial keeps a reason, the retry gets a clean owner, and whichever of the two
    checks fails the trial first is the only one that retries it.
    """
    if not optuna_internals.heartbeat_interval(study):
        return []
    stale = optuna_internals.stale_trial_numbers(study)
    settings = config["study"]
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
        if trial.number in stale:
            reason = f"worker died: no heartbeat for over {settings['grace_period']} s (study.grace_period)"
            if fail_and_retry(study, trial, reason, settings["max_retries"], study_budget(study, config)):
                failed.append(trial.number)
    return failed
