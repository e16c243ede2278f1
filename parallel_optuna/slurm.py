"""SLURM: every command the tool runs against the scheduler, each with a timeout and a checked status.

The rest of the tool asks this module; none of it runs sbatch, squeue, sacct, sacctmgr, scontrol or scancel itself.
A command that fails or does not answer raises SlurmError (the scheduler's answer, not bad input), or,
where the caller can go on without the answer, returns what "unknown" means there (None, {}, a default).
"""

import functools
import re
import shlex
import shutil
import socket
import subprocess

TIMEOUT_S = 60
SBATCH_TIMEOUT_S = 120  # a busy controller takes its time to accept an array; sbatch waits for it
DEFAULT_MAX_ARRAY_SIZE = 1001  # SLURM's own default MaxArraySize


class SlurmError(Exception):
    """A SLURM command that is missing, failed, or did not answer in time."""


def quote_command(words: list) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def hostname() -> str:
    return socket.gethostname()


def available(command: str = "sbatch") -> bool:
    return shutil.which(command) is not None


def call(command: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run one SLURM command as it is; SlurmError when it is missing or does not answer in time."""
    if not available(command[0]):
        raise SlurmError(f"{command[0]} is not on PATH; fix: run this on a SLURM login node")
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(
            f"{command[0]} gave no answer within {timeout:.0f} s; fix: try again when SLURM answers"
        ) from None


def run(command: list[str], ok_if: str | None = None, timeout: float = TIMEOUT_S) -> str:
    """Run a SLURM command and check its status; its stdout. An error whose text holds `ok_if` is no error."""
    result = call(command, timeout)
    if result.returncode != 0 and not (ok_if and ok_if in result.stderr):
        problem = f"{quote_command(command)} exited {result.returncode}: {result.stderr.strip()}"
        raise SlurmError(f"{problem}; fix: check the job ids with squeue --me")
    return result.stdout


def squeue(*selection: str, fields: str = "%F|%i|%T|%r") -> list[list[str]]:
    """One squeue of array tasks (one row per task, split on '|'); a job that has left the queue is no error."""
    out = run(["squeue", "--noheader", "--array", f"--format={fields}", *selection], ok_if="Invalid job id")
    width = fields.count("|")
    return [line.strip().split("|", width) for line in out.splitlines() if line.count("|") >= width]


def squeue_jobs(job_ids: set[str], fields: str) -> list[list[str]] | None:
    """The tasks of these jobs; [] once they all left the queue; None when SLURM cannot be asked."""
    try:
        return squeue(f"--jobs={','.join(sorted(job_ids))}", fields=fields)
    except SlurmError:
        return None


def sacct(job_ids: list[str], fields: tuple[str, ...], steps: bool = False, every_run: bool = False) -> list[dict]:
    """Accounting records of these jobs (or array tasks, `1234_5`); [] where accounting is off or does not answer.

    Allocations only, unless `steps`; the latest run of a requeued task only, unless `every_run`.
    """
    if not available("sacct") or not job_ids:
        return []
    command = ["sacct", "--noheader", "--parsable2", f"--jobs={','.join(job_ids)}", f"--format={','.join(fields)}"]
    command += ([] if steps else ["--allocations"]) + (["--duplicates"] if every_run else [])
    try:
        out = call(command)
    except SlurmError:
        print(f"note: sacct did not answer within {TIMEOUT_S} s: ended tasks show as 'ended'")
        return []
    if out.returncode != 0:  # "Slurm accounting storage is disabled"
        return []
    rows = [line.split("|") for line in out.stdout.splitlines() if line.count("|") == len(fields) - 1]
    return [dict(zip(fields, row, strict=True)) for row in rows]


def sacct_states(job_ids: list[str]) -> dict[str, str]:
    """{task: State} of ended tasks, from one sacct call; {} where accounting is off or does not answer."""
    return {row["JobID"]: row["State"] for row in sacct(job_ids, ("JobID", "State"))}


def sbatch(command: list[str]) -> subprocess.CompletedProcess:
    """Submit with sbatch; a timeout is a failure that says the array may be queued all the same."""
    try:
        return call(command, timeout=SBATCH_TIMEOUT_S)
    except SlurmError:
        why = f"no answer within {SBATCH_TIMEOUT_S} s: it may be queued all the same; check squeue --me first"
        return subprocess.CompletedProcess(command, 1, "", why)


def test_request(flags: list[str]) -> str | None:
    """What `sbatch --test-only` says against one task of this request; None when SLURM would take it (or is slow)."""
    try:
        result = call(["sbatch", "--test-only", *flags, "--wrap=true"])
    except SlurmError:
        return None  # a slow controller: the submit itself will say what it says
    return " ".join(result.stderr.split())[:300] if result.returncode != 0 else None


@functools.cache  # one call per process: the submit asks it for MaxArraySize and ClusterName
def show_config() -> str:
    """`scontrol show config`; SlurmError (not kept) when SLURM does not answer."""
    return call(["scontrol", "show", "config"]).stdout


def config_value(name: str) -> str | None:
    """One value of `scontrol show config`; None when SLURM does not answer or does not set it."""
    try:
        out = show_config()
    except SlurmError:
        return None
    match = re.search(rf"^{name}\s*=\s*(\S+)", out, re.MULTILINE)
    return match.group(1) if match else None


def max_array_size() -> int:
    """Array indexes must stay below the cluster's MaxArraySize."""
    value = config_value("MaxArraySize")
    return int(value) if value and value.isdigit() else DEFAULT_MAX_ARRAY_SIZE


def sacctmgr(*words: str) -> list[list[str]] | None:
    """Rows of one `sacctmgr show ...`, split on '|'; None where there is no accounting or it does not answer."""
    if not available("sacctmgr"):
        return None
    try:
        result = call(["sacctmgr", "--noheader", "--parsable2", "show", *words])
    except SlurmError:
        return None
    return [line.split("|") for line in result.stdout.splitlines()] if result.returncode == 0 else None


# Every state of a job that still counts against a submit limit (squeue's names for them).
QUEUED_STATES = "PD,R,S,CF,CG,RQ,RS,RH,SE,RF,SO,ST,RD"


def my_queued_jobs(*selection: str) -> int | None:
    """How many jobs of this user SLURM holds now (e.g. "--qos=normal"), each array task one."""
    try:
        out = run(["squeue", "--me", "--array", "--noheader", "--format=%i", f"--states={QUEUED_STATES}", *selection])
    except SlurmError:
        return None
    return len(out.split())


def requeue_task(task: str) -> str | None:
    """Requeue exactly this array task; None on success, else what went wrong.

    Always `<array job>_<task>`: one task of every array runs under the array's own job id, and
    `scontrol requeue <that id>` would requeue (and SIGTERM) every task of the array.
    """
    try:
        result = call(["scontrol", "requeue", task])
    except SlurmError as e:
        return f"scontrol requeue {task}: {e}"
    if result.returncode != 0:
        return f"scontrol requeue {task} exited {result.returncode}: {result.stderr.strip()}"
    return None
