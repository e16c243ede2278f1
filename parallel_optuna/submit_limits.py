"""Arrays that fit the user's submit limits: submit what fits now, and chain a job that submits the rest.

Sites cap how many jobs a user may have queued: the association's MaxSubmitJobs and the QOS's
MaxSubmitJobsPerUser. Every array task counts as a job, and an array that does not fit is refused
whole. So the submit reads the limits (sacctmgr) and the user's jobs queued under each (squeue
--account, --qos), submits as many tasks as leave room for one more job, and that job
(`next_part_job.sbatch`) runs the same submit once the array has ended. Each part is a submit like
any other: it counts what the study still needs, so the budget stays exact and no task is submitted
twice. The chained one (--next_part) stops there when the trainer has failed every trial since.
"""

from __future__ import annotations

import getpass
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna

from parallel_optuna import attributes as attr
from parallel_optuna import slurm
from parallel_optuna.study import now

if TYPE_CHECKING:  # names for the hints only: importing them would make a cycle
    from parallel_optuna.config import Config


@dataclass
class Room:
    """How many more jobs the tightest limit lets this user queue now, and that limit in words."""

    free: int
    limit: str


def tightest(config: Config) -> Room | None:
    """The submit limit that leaves the least room; None where none is set or accounting cannot be read."""
    account = config["slurm"]["account"] or default_account()
    association = association_row(account, config["slurm"]["partition"])
    if association is None:
        return None
    qos = config["slurm"]["qos"] or association["DefaultQOS"] or single(association["QOS"]) or "normal"
    rooms = []
    if association["MaxSubmit"].isdigit():
        limit = int(association["MaxSubmit"])
        rooms.append(room(limit, f"association {account} MaxSubmitJobs={limit}", f"--account={account}"))
    per_user = slurm.sacctmgr("qos", "where", f"name={qos}", "format=MaxSubmitPU") or []
    if per_user and per_user[0][0].isdigit():
        limit = int(per_user[0][0])
        rooms.append(room(limit, f"QOS {qos} MaxSubmitJobsPerUser={limit}", f"--qos={qos}"))
    known = [r for r in rooms if r is not None]
    return min(known, key=lambda r: r.free) if known else None


def room(limit: int, what: str, selection: str) -> Room | None:
    """The room under one limit: only the user's jobs under that account or QOS count against it."""
    queued = slurm.my_queued_jobs(selection)
    return None if queued is None else Room(limit - queued, f"{what}, {queued} of your jobs under it queued")


def default_account() -> str:
    rows = slurm.sacctmgr("user", getpass.getuser(), "format=DefaultAccount") or [[""]]
    return rows[0][0]


def association_row(account: str, partition: str | None) -> dict[str, str] | None:
    """The user's association for this account (a partition's own one first), as sacctmgr shows it:
    limits set on a parent account show on it. None where there is no accounting."""
    fields = ("Partition", "MaxSubmit", "DefaultQOS", "QOS")
    where = [f"user={getpass.getuser()}", f"account={account}", f"cluster={slurm.config_value('ClusterName') or ''}"]
    rows = [
        dict(zip(fields, r, strict=True))
        for r in slurm.sacctmgr("assoc", "where", *where, f"format={','.join(fields)}") or []
        if len(r) == len(fields)
    ]
    rows.sort(key=lambda r: r["Partition"] != (partition or ""))
    return rows[0] if rows else None


def single(allowed: str) -> str:
    """The QOS a job gets by default where the association allows only one."""
    return "" if "," in allowed else allowed


def tasks_now(n_tasks: int, room: Room | None, extra_jobs: int = 0) -> int:
    """How many of n_tasks to submit now: all when they fit, else what leaves room for the next part's job
    (0 when not even one task and that job fit)."""
    if room is None or n_tasks + extra_jobs <= room.free:
        return n_tasks
    return max(0, room.free - extra_jobs - 1)


def record(study: optuna.Study, tasks: int, limit: str | None, job: str | None) -> None:
    """The part of the study left for later, on the study (None once everything was submitted)."""
    later = {"tasks": tasks, "limit": limit, "job_id": job, "recorded_at": now()} if tasks else None
    if later or study.user_attrs.get(attr.NEXT_PART):  # a submit with nothing held back writes nothing
        study.set_user_attr(attr.NEXT_PART, later)


def status_line(study: optuna.Study, ask_slurm: bool = False) -> str | None:
    """The part left for later, and who submits it; with ask_slurm, whether that job is still queued."""
    later = study.user_attrs.get(attr.NEXT_PART)
    if not later:
        return None
    job = later["job_id"]
    by = f"job {job} submits them" if job else "no job submits them: submit again"
    if job and ask_slurm and slurm.squeue_jobs({job}, "%i|%T") == []:
        by = f"job {job} has left the queue without submitting them: submit again"
    return f"{later['tasks']} task(s) not submitted yet ({later['limit']} at {later['recorded_at']}): {by}"
