"""Arrays that fit the user's submit limits: submit what fits now, and chain a job that submits the rest.

Sites cap how many jobs a user may have queued: the association's MaxSubmitJobs and the QOS's
MaxSubmitJobsPerUser. Every array task counts as a job, and an array that does not fit is refused
whole. So the submit reads the limits (sacctmgr) and the user's queued jobs (squeue), submits as
many tasks as leave room for one more job, and that job (`next_part_job.sbatch`) runs the same
submit once the array has ended. Each part is a submit like any other: it counts what the study
still needs, so the budget stays exact and no task is submitted twice.
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
    queued = slurm.my_queued_jobs()
    limits = association_limit(config) + qos_limit(config)
    if queued is None or not limits:
        return None
    most, what = min(limits)
    return Room(most - queued, f"{what}={most}, {queued} of your jobs queued")


def association_limit(config: Config) -> list[tuple[int, str]]:
    """[(MaxSubmitJobs, its name)] of the user's association for slurm.account (sacctmgr shows inherited ones)."""
    where = [f"user={getpass.getuser()}", f"cluster={slurm.config_value('ClusterName') or ''}"]
    if config["slurm"]["account"]:
        where.append(f"account={config['slurm']['account']}")
    rows = slurm.sacctmgr("assoc", "where", *where, "format=Account,Partition,MaxSubmit,DefaultQOS,QOS") or []
    partition = config["slurm"]["partition"]
    rows = [r for r in rows if len(r) == 5 and r[1] in ("", partition)]
    return [(int(r[2]), f"association {r[0]} MaxSubmitJobs") for r in rows if r[2].isdigit()][:1]


def qos_limit(config: Config) -> list[tuple[int, str]]:
    """[(MaxSubmitJobsPerUser, its name)] of the QOS the array runs under: slurm.qos, else the default one."""
    qos = config["slurm"]["qos"] or default_qos(config)
    rows = slurm.sacctmgr("qos", "where", f"name={qos}", "format=Name,MaxSubmitPU") or []
    return [(int(r[1]), f"QOS {r[0]} MaxSubmitJobsPerUser") for r in rows if len(r) == 2 and r[1].isdigit()][:1]


def default_qos(config: Config) -> str:
    where = [f"user={getpass.getuser()}"] + (
        [f"account={config['slurm']['account']}"] if config["slurm"]["account"] else []
    )
    rows = slurm.sacctmgr("assoc", "where", *where, "format=DefaultQOS,QOS") or []
    for default, allowed in (r for r in rows if len(r) == 2):
        if default or "," not in allowed:
            return default or allowed or "normal"
    return "normal"


def tasks_now(n_tasks: int, room: Room | None, extra_jobs: int = 0) -> int:
    """How many of n_tasks to submit now: all when they fit, else what leaves room for the next part's job.

    Raises SlurmError, with the limit, when not even one task and that job fit.
    """
    if room is None or n_tasks + extra_jobs <= room.free:
        return n_tasks
    if room.free - extra_jobs < 2:
        raise slurm.SlurmError(
            f"no room for the array under the {room.limit}; fix: submit again once some of your jobs have ended"
        )
    return room.free - extra_jobs - 1


def record(study: optuna.Study, tasks: int, limit: str | None, job: str | None) -> None:
    """The part of the study left for later, on the study (None once everything was submitted)."""
    later = {"tasks": tasks, "limit": limit, "job_id": job, "recorded_at": now()} if tasks else None
    study.set_user_attr(attr.NEXT_PART, later)


def status_line(study: optuna.Study) -> str | None:
    later = study.user_attrs.get(attr.NEXT_PART)
    if not later:
        return None
    by = f"job {later['job_id']} submits them" if later["job_id"] else "no job submits them: submit again"
    return f"{later['tasks']} task(s) not submitted yet ({later['limit']} at {later['recorded_at']}): {by}"
