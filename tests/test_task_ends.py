"""Why a task died: accounting's one line in status, and the same words on the trial it killed."""

import re

from conftest import load_study, plugin_experiment, run_script
from slurm_helpers import submitted_jobs, wait_for_jobs

from parallel_optuna import task_ends
from parallel_optuna.config import load_config


def test_a_task_killed_for_memory_or_walltime_says_why_in_status_and_on_its_trial(memory_enforced, tmp_path):
    # Both at once: the walltime one takes SLURM's minute, the memory one a few seconds. SLURM sends the walltime
    # signal at its first 30-s check past the end less signal_grace less 30 s: with 30 s of a minute that can be the
    # moment the task starts, before its shell has set the trap, which the signal then kills. 10 s: 20 s in or later.
    one_trial = {"study.n_trials": 1, "study.max_retries": 0, "slurm.max_concurrent_jobs": 1}
    oom = plugin_experiment(tmp_path / "oom", {**one_trial, "training.grow_mb": 1500})
    timeout = plugin_experiment(
        tmp_path / "timeout", {**one_trial, "training.hang": 600, "slurm.walltime": "1", "slurm.signal_grace": 10}
    )
    jobs = {}
    for name, path in (("oom", oom), ("timeout", timeout)):
        out = run_script("submit_study.py", "--config", path)
        assert out.returncode == 0, out.stdout + out.stderr
        jobs[name] = submitted_jobs(out.stdout)
    wait_for_jobs(jobs["oom"] + jobs["timeout"], timeout=240)

    status = run_script("submit_study.py", "--config", oom, "--status").stdout
    reason = load_study(oom).trials[0].user_attrs["fail_reason"]
    assert re.search(r"OUT_OF_MEMORY \(MaxRSS \d+(\.\d)?[MG] of 500M\): raise slurm.mem_per_cpu", reason), reason
    assert f"task {jobs['oom'][0]}_0: {reason.partition(': task ')[2].partition(': ')[2]}" in status, status

    status = run_script("submit_study.py", "--config", timeout, "--status").stdout
    reason = load_study(timeout).trials[0].user_attrs["fail_reason"]
    assert reason.startswith(f"worker died: task {jobs['timeout'][0]}_0: TIMEOUT after 00:0"), reason
    assert "trial 0 never checkpointed" in reason and "raise slurm.walltime" in reason
    assert f"task {jobs['timeout'][0]}_0: TIMEOUT" in status and "never checkpointed" in status, status


def test_a_node_failure_says_whether_slurm_requeued_the_task(tmp_path):
    config = load_config(plugin_experiment(tmp_path))
    requeued = task_ends.TaskEnd("7_1", "NODE_FAIL", elapsed="00:03:00", requeued=True)
    assert "SLURM requeued the task, and trial 4 resumed" in task_ends.why(requeued, Trial(4), config)
    dropped = task_ends.TaskEnd("7_1", "PREEMPTED", elapsed="00:03:00")
    assert "not requeued: trial 4 was failed, and its retry, trial 9, resumes" in task_ends.why(
        dropped, Trial(4), config, retry=9
    )
    assert "not retried (study.max_retries" in task_ends.why(dropped, Trial(4), config, retry=False)
    assert "retried from its last checkpoint while study.max_retries allows" in task_ends.why(dropped, Trial(4), config)


def test_a_plain_objective_past_its_walltime_is_told_about_stop_requested(tmp_path):
    config = load_config(plugin_experiment(tmp_path))
    timeout = task_ends.TaskEnd("7_1", "TIMEOUT", elapsed="01:00:00")
    assert "never checkpointed" in task_ends.why(timeout, Trial(4), config), "a trainer without a checkpoint.pt"
    config["study"]["objective"] = "plugin:objective"
    said = task_ends.why(timeout, Trial(4), config)
    assert "trial 4 did not stop within slurm.signal_grace" in said and "trial_control.stop_requested()" in said


def test_accounting_sizes_read_as_sacct_writes_them():
    assert task_ends.bytes_of("229624K") == 229624 * 1024
    assert task_ends.bytes_of("3.9G") == int(3.9 * (1 << 30))
    assert task_ends.bytes_of("") is None and task_ends.bytes_of("0") == 0
    assert task_ends.gigabytes(int(3.9 * (1 << 30))) == "3.9G" and task_ends.gigabytes(480 << 20) == "480M"


class Trial:
    """What why() reads of a trial: its number and its attributes."""

    def __init__(self, number):
        self.number, self.user_attrs = number, {}
