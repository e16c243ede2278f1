"""Why an array task died, in one line from SLURM's accounting, with the fix.

    task 1234_5: OUT_OF_MEMORY (MaxRSS 3.9G of 4G): raise slurm.mem_per_cpu

Status prints one such line for each task that ended badly. Liveness fails the trial that ran in
the task with the same words as its fail_reason, so the trial and the task tell one story.
Needs accounting (sacct); where a site has none, SLURM's state from squeue is all there is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState

from parallel_optuna import attributes as attr
from parallel_optuna import slurm
from parallel_optuna.checkpoints import CHECKPOINT, trial_folder

if TYPE_CHECKING:  # names for the hints only: importing them would make a cycle
    from parallel_optuna.config import Config

FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "ReqMem", "Start")
# Ends that say something went wrong. REQUEUED is the worker's own walltime requeue; CANCELLED is a person.
BAD = ("OUT_OF_MEMORY", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "FAILED", "BOOT_FAIL", "DEADLINE")
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass
class TaskEnd:
    """One run of an array task as accounting recorded it (a requeued task has one per run)."""

    task: str
    state: str
    exit_code: str = ""
    elapsed: str = ""
    max_rss: int | None = None  # bytes, the largest of its steps; None when never sampled
    req_mem: str = ""
    requeued: bool = False  # SLURM ran the task again after this run
    start: str = ""  # ISO time; "Unknown" (after any date) for a run still pending

    @property
    def bad(self) -> bool:
        return self.state in BAD


def read(job_ids: list[str]) -> list[TaskEnd]:
    """Every run of every task of these jobs (or tasks), oldest first: one sacct call, and one more for the
    MaxRSS of the runs that ended badly."""
    rows = slurm.sacct(job_ids, FIELDS, every_run=True)
    runs = sorted(
        (
            TaskEnd(
                r["JobID"], r["State"].split(" ")[0], r["ExitCode"], r["Elapsed"], None, r["ReqMem"], False, r["Start"]
            )
            for r in rows
        ),
        key=lambda run: run.start,  # sacct groups the runs of a requeued array by record, not by time
    )
    latest = {run.task: run for run in runs}
    for run in runs:
        run.requeued = latest[run.task] is not run
    bad_tasks = sorted({run.task for run in runs if run.bad})
    if bad_tasks:
        add_max_rss([run for run in runs if run.task in bad_tasks], bad_tasks)
    return runs


def add_max_rss(runs: list[TaskEnd], tasks: list[str]) -> None:
    """The largest MaxRSS of each run's steps; a step belongs to the last run of its task that started before it."""
    for row in slurm.sacct(tasks, ("JobID", "MaxRSS", "Start"), steps=True, every_run=True):
        task, _, step = row["JobID"].partition(".")
        rss = bytes_of(row["MaxRSS"])
        owners = [run for run in runs if run.task == task and run.start <= row["Start"]]
        if step and rss is not None and owners:
            owners[-1].max_rss = max(owners[-1].max_rss or 0, rss)


def bytes_of(text: str) -> int | None:
    """sacct's 229624K as bytes; None for an empty field (a step that never ran)."""
    if not text:
        return None
    number, unit = (text[:-1], text[-1]) if text[-1] in UNITS else (text, "")
    try:
        return int(float(number) * UNITS.get(unit, 1))
    except ValueError:
        return None


def gigabytes(n: int) -> str:
    return f"{n / UNITS['G']:.1f}G" if n >= UNITS["G"] else f"{n / UNITS['M']:.0f}M"


def why(end: TaskEnd, trial: FrozenTrial | None, config: Config, retry: int | bool | None = None) -> str:
    """What killed the task and what to do, for the trial that ran in it.

    `retry`: the number of the trial's retry, False when it has none, None when that is not decided yet.
    """
    name = f"trial {trial.number}" if trial else "its trial"
    if end.state == "OUT_OF_MEMORY":
        rss = gigabytes(end.max_rss) if end.max_rss else "not sampled before the kill"
        return f"OUT_OF_MEMORY (MaxRSS {rss} of {end.req_mem or '?'}): raise slurm.mem_per_cpu"
    if end.state == "TIMEOUT":
        return f"TIMEOUT after {end.elapsed}: {timed_out(trial, name, config)}"
    if end.state in ("NODE_FAIL", "PREEMPTED"):
        return f"{end.state} after {end.elapsed}: {after_a_kill(end, name, retry)}"
    if end.state == "FAILED":
        return f"FAILED with exit code {end.exit_code} after {end.elapsed}: see {log_of(trial)}"
    return f"{end.state} after {end.elapsed}"


def timed_out(trial: FrozenTrial | None, name: str, config: Config) -> str:
    """The walltime came before a safe point: a worker that reaches one in time requeues its task instead."""
    if config["study"]["objective"]:  # its checkpoint is the objective's own file, under any name
        return (
            f"{name} did not stop within slurm.signal_grace ({config['slurm']['signal_grace']} s); ask "
            "trial_control.stop_requested() every epoch and save then, or raise slurm.walltime"
        )
    if trial is None or not (trial_folder(config, trial.number) / CHECKPOINT).exists():
        return (
            f"{name} never checkpointed, so nothing of it was kept; call save_checkpoint() in the training loop, "
            "or raise slurm.walltime"
        )
    return (
        f"{name} reached no save_checkpoint() within slurm.signal_grace ({config['slurm']['signal_grace']} s); "
        "save more often, or raise slurm.signal_grace"
    )


def after_a_kill(end: TaskEnd, name: str, retry: int | bool | None) -> str:
    if end.requeued:
        return f"SLURM requeued the task, and {name} resumed from its last checkpoint"
    if retry is None:
        return (
            f"not requeued: {name} was failed, and is retried from its last checkpoint while study.max_retries allows"
        )
    if retry is False:
        return f"not requeued: {name} was failed, and not retried (study.max_retries, or the budget was covered)"
    return f"not requeued: {name} was failed, and its retry, trial {retry}, resumes from its last checkpoint"


def log_of(trial: FrozenTrial | None) -> str:
    return trial.user_attrs.get(attr.SLURM_OUT, "the task's .out file") if trial else "the task's .out file"


def latest(job_ids: list[str]) -> dict[str, TaskEnd]:
    """{task: its latest run}."""
    return {end.task: end for end in read(job_ids)}


def victim(task: str, trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The trial that was running in the task when it died: the one failed for it, or still running."""
    ran = [t for t in trials if t.user_attrs.get(attr.SLURM_TASK) == task]
    dead = [
        t for t in ran if t.state == TrialState.FAIL and t.user_attrs.get(attr.FAIL_REASON, "").startswith("worker")
    ]
    running = [t for t in ran if t.state == TrialState.RUNNING]
    return (dead or running or ran or [None])[-1]


def status_lines(job_ids: list[str], trials: list[FrozenTrial], config: Config) -> tuple[dict[str, str], list[str]]:
    """({task: SLURM state} of ended tasks, one line for each run of a task that ended badly)."""
    runs = read(job_ids)
    latest = {end.task: end for end in runs}
    lines = []
    for end in runs:
        if not end.bad:
            continue
        trial = victim(end.task, trials)
        stored = trial.user_attrs.get(attr.FAIL_REASON, "") if trial else ""
        said = stored.partition(f"task {end.task}: ")[2]  # the words liveness failed the trial with: its last run's
        if latest[end.task] is not end or not said.startswith(end.state):
            retry = next((t.number for t in trials if trial and t.user_attrs.get(attr.RETRY_OF) == trial.number), False)
            said = why(end, trial, config, retry)
        lines.append(f"task {end.task}: {said}")
    return {task: end.state for task, end in latest.items()}, lines
