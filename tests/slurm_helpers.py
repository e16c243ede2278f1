"""Helpers for the tests that submit real job arrays to the local SLURM cluster."""

import subprocess
import time


def squeue(*args):
    out = subprocess.run(["squeue", "--noheader", "--array", *args], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def job_ids():
    """The ids of this user's queued and running tasks (their elapsed times change, their ids do not)."""
    return {line.split()[0] for line in squeue("--me")}


def wait_until(condition, timeout=240, every=0.5, what="condition"):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def wait_for_jobs(job_ids, timeout=300):
    """Until none of the jobs is pending or running.

    A requeued task waits out its credential (cred_expire=10 s on the local cluster): starting it
    sooner makes SLURM kill it ("Job credential revoked"), so it is left to wait.
    """

    def gone():
        left = squeue(f"--jobs={','.join(job_ids)}", "--format=%i|%T|%r")
        for line in left:
            task, state, reason = line.split("|", 2)
            if state == "PENDING" and "held" in reason.lower():  # JobHeldAdmin: a launch that failed (node down)
                subprocess.run(["scontrol", "release", task], capture_output=True)
        return not left

    wait_until(gone, timeout, what=f"jobs {job_ids} to end")


def submitted_jobs(stdout):
    return [line.split()[3].rstrip(":") for line in stdout.splitlines() if line.startswith("submitted array job")]
