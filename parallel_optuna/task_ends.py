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

FIELDS = ("JobID", "State", "ExitCode", "Elapsed", "MaxRSS", "ReqMem")
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

    @property
    def bad(self) -> bool:
        return self.state in BAD


def read(job_ids: list[str]) -> list[TaskEnd]:
    """Every run of every task of these jobs, oldest run first, from one sacct call."""
    runs: list[TaskEnd] = []
    for row in slurm.sacct(job_ids, FIELDS, steps=True):
        task, _, step = row["JobID"].partition(".")
        if not step:
            for earlier in runs:
                earlier.requeued |= earlier.task == task
            state = row["State"].split()[0] if row["State"] else ""  # "CANCELLED by 0"
            runs.append(TaskEnd(task, state, row["ExitCode"], row["Elapsed"], None, row["ReqMem"]))
        elif runs and runs[-1].task == task and bytes_of(row["MaxRSS"]) is not None:
            runs[-1].max_rss = max(runs[-1].max_rss or 0, bytes_of(row["MaxRSS"]))
    return runs


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


def why(end: TaskEnd, trial: FrozenTrial | None, config: Config, retry: int | None | bool = None) -> str:
    """What killed the task and what to do, for the trial that ran in it.

    `retry`: the number of the trial's retry, True when one is about to be queued, False when none is left.
    """
    name = f"trial {trial.number}" if trial else "its trial"
    if end.state == "OUT_OF_MEMORY":
        rss = gigabytes(end.max_rss) if end.max_rss else "not sampled before the kill"
        return f"OUT_OF_MEMORY (MaxRSS {rss} of {end.req_mem or '?'}): raise slurm.mem_per_cpu"
    if end.state == "TIMEOUT":
        if trial is None or not (trial_folder(config, trial.number) / CHECKPOINT).exists():
            return (
                f"TIMEOUT after {end.elapsed}: {name} never checkpointed, so nothing of it was kept; "
                "call save_checkpoint() in the training loop, or raise slurm.walltime"
            )
        return (
            f"TIMEOUT after {end.elapsed}: {name} reached no save_checkpoint() within slurm.signal_grace "
            f"({config['slurm']['signal_grace']} s); save more often, or raise slurm.signal_grace"
        )
    if end.state in ("NODE_FAIL", "PREEMPTED"):
        return f"{end.state} after {end.elapsed}: {after_a_kill(end, trial, name, retry)}"
    if end.state == "FAILED":
        return f"FAILED with exit code {end.exit_code} after {end.elapsed}: see {log_of(trial)}"
    return f"{end.state} after {end.elapsed}"


def after_a_kill(end: TaskEnd, trial: FrozenTrial | None, name: str, retry: int | None | bool) -> str:
    if end.requeued:
        return f"SLURM requeued the task, and {name} resumed from its last checkpoint"
    if retry is False:
        return f"not requeued: {name} was failed, with no retry left (study.max_retries)"
    if retry is True or retry is None:
        return f"not requeued: {name} was failed, and its retry resumes from its last checkpoint"
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
    lines = []
    for end in runs:
        if not end.bad:
            continue
        trial = victim(end.task, trials)
        stored = trial.user_attrs.get(attr.FAIL_REASON, "") if trial else ""
        said = stored.partition(f"task {end.task}: ")[2]  # the words liveness failed the trial with
        retry = next((t.number for t in trials if trial and t.user_attrs.get(attr.RETRY_OF) == trial.number), None)
        lines.append(f"task {end.task}: {said or why(end, trial, config, retry)}")
    return {end.task: end.state for end in runs}, lines
