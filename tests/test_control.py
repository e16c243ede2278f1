"""Controlling a running study: Ctrl-C of a local run, and throttle, pause, cancel, submit-as-job on the cluster."""

import datetime
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import PROJECT, finished, load_study, plugin_experiment, run_script
from slurm_helpers import job_ids, squeue, submitted_jobs, wait_for_jobs, wait_until
from test_faults import assert_study_whole, running_trial_with_checkpoint

from parallel_optuna import status

SLOW = {"training.sleep": 1.0, "training.epochs": 6}


def control(path, *flags):
    out = run_script("submit_study.py", "--config", path, *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def linked_retries(study, reason):
    """Each trial stopped with this reason, and its retry: same params, the whole curve from its checkpoint."""
    stopped = [t for t in study.trials if t.state.name == "FAIL" and t.user_attrs["fail_reason"] == reason]
    assert stopped, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]
    for t in stopped:
        retry = next(r for r in study.trials if r.user_attrs.get("retry_of") == t.number)
        assert retry.state.name == "COMPLETE" and retry.params == t.params
        assert sorted(retry.intermediate_values) == list(range(6))
    return stopped


def test_ctrl_c_of_a_local_run_then_rerun_continues_the_trials(tmp_path):
    path = plugin_experiment(tmp_path, {**SLOW, "study.n_trials": 3})
    command = [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path), "--local", "2"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_until(lambda: len(list(path.parent.glob("runs/tiny/trials/*/checkpoint.pt"))) == 2, what="2 checkpoints")
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130 and "Traceback" not in err, err
    assert "run the same command again" in err
    study = load_study(path)
    assert sorted(t.state.name for t in study.trials) == ["FAIL", "FAIL"]
    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 0, out.stdout + out.stderr
    study = load_study(path)
    assert_study_whole(study, 3)
    assert len(linked_retries(study, "interrupted by SIGINT")) == 2


@pytest.mark.slurm
def test_throttle_a_hand_submitted_array_then_a_later_submit_keeps_it(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {**SLOW, "study.n_trials": 4, "slurm.max_concurrent_jobs": 1})
    control(path, "--no-submit_jobs")
    script = path.parent / "runs/tiny/array_job.sbatch"
    sbatch = ["sbatch", "--parsable", "--array=0-3%1", str(script)]  # by hand: found by its job name
    job = subprocess.run(sbatch, capture_output=True, text=True, check=True).stdout.strip()
    running_trial_with_checkpoint(path)
    status = control(path, "--status").stdout
    assert "ETA: once a trial has finished (1 at once)" in status and " ago" in status  # the last step
    assert f"{job}" in control(path, "--throttle", 2).stdout
    assert (
        "ArrayTaskThrottle=2" in subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    )
    wait_until(lambda: len(squeue(f"--jobs={job}", "--states=RUNNING")) == 2, what="2 tasks at once")
    assert load_study(path).user_attrs["max_concurrent_jobs"] == 2
    wait_for_jobs([job])
    assert "--array=0-0%2" in control(path, "--n_trials", 5, "--no-submit_jobs").stdout
    assert "--array=0-0%3" in control(path, "--n_trials", 5, "--max_concurrent_jobs", 3, "--no-submit_jobs").stdout


@pytest.mark.slurm
def test_pause_holds_the_queue_and_resume_finishes_the_budget(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {**SLOW, "study.n_trials": 3, "slurm.max_concurrent_jobs": 1})
    jobs = submitted_jobs(control(path).stdout)
    running_trial_with_checkpoint(path)
    control(path, "--pause")
    study = load_study(path)
    status = control(path, "--status").stdout
    assert "paused" in status and any(
        line.startswith(f"{jobs[0]}_") and " HELD " in line for line in status.splitlines()
    )
    assert all("Held" in line for line in squeue(f"--jobs={jobs[0]}", "--states=PENDING", "--format=%r"))
    wait_until(lambda: not [t for t in study.get_trials() if t.state.name == "RUNNING"], what="the trial to end")
    time.sleep(5)
    assert len(study.get_trials()) == 1, "no new trial starts while paused"
    control(path, "--resume")
    wait_for_jobs(jobs)
    assert_study_whole(load_study(path), 3)


@pytest.mark.slurm
def test_a_task_that_starts_while_paused_waits_held_for_resume(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 1})
    control(path, "--no-submit_jobs")
    control(path, "--pause")
    sbatch = ["sbatch", "--parsable", "--array=0", str(path.parent / "runs/tiny/array_job.sbatch")]
    job = subprocess.run(sbatch, capture_output=True, text=True, check=True).stdout.strip()
    held = lambda: "held" in "".join(squeue(f"--jobs={job}", "--states=PENDING", "--format=%r")).lower()  # noqa: E731
    wait_until(held, what="the task back in the queue, held")
    assert load_study(path).trials == []
    control(path, "--resume")
    wait_for_jobs([job])
    assert len(finished(load_study(path))) == 1


@pytest.mark.slurm
def test_cancel_then_submit_continues_the_cancelled_trials(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {**SLOW, "study.n_trials": 4, "slurm.max_concurrent_jobs": 2})
    jobs = submitted_jobs(control(path).stdout)
    running_trial_with_checkpoint(path)
    held = ["sbatch", "--parsable", "--hold", "--job-name=optuna_submit_tiny", "--output=/dev/null", "--wrap=true"]
    submitter = subprocess.run(held, capture_output=True, text=True, check=True).stdout.strip()  # as --as_job's
    out = control(path, "--cancel")
    assert f"submit job(s) {submitter} cancelled too" in out.stdout
    wait_for_jobs(jobs + [submitter])
    study = load_study(path)
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    cancelled = [t for t in study.trials if t.user_attrs.get("fail_reason") == "cancelled"]
    assert cancelled and all((path.parent / f"runs/tiny/trials/{t.number}/checkpoint.pt").exists() for t in cancelled)
    out = control(path)
    assert "continue from their checkpoints as linked retries" in out.stdout
    wait_for_jobs(submitted_jobs(out.stdout))
    study = load_study(path)
    assert_study_whole(study, 4)
    linked_retries(study, "cancelled")


@pytest.mark.slurm
def test_cancel_waits_for_the_checkpoint_of_an_epoch_longer_than_killwait(slurm, tmp_path):
    """The local cluster's KillWait is 5 s: a plain scancel would SIGKILL this 8 s epoch unsaved."""
    path = plugin_experiment(tmp_path, {"training.sleep": 8.0, "training.epochs": 3, "study.n_trials": 1})
    jobs = submitted_jobs(control(path).stdout)
    study = load_study(path)
    wait_until(lambda: any("pid" in t.user_attrs for t in study.get_trials()), what="a trial that trains")
    out = control(path, "--cancel")
    assert "checkpoint at their next save_checkpoint()" in out.stdout and "--cancel again" in out.stdout
    wait_for_jobs(jobs)
    trial = load_study(path).trials[0]
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "cancelled", trial.user_attrs
    assert (path.parent / "runs/tiny/trials/0/checkpoint.pt").exists(), "the epoch under way was saved"
    assert "end them at once" not in control(path, "--cancel").stdout, "a second cancel ends tasks at once"


@pytest.mark.slurm
def test_submit_as_job_submits_the_array_and_the_finish_job_exports_the_best(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 2})
    before = job_ids()
    bad = run_script("submit_study.py", "--config", path, "--as_job", "--n_trials", 0)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "study.n_trials" in bad.stderr
    assert job_ids() <= before and not (path.parent / "runs").exists()
    out = control(path, "--as_job", "--notify_on_finish")
    job = out.stdout.split()[2].rstrip(":")
    wait_for_jobs([job])
    study = load_study(path)
    arrays = [j["job_id"] for j in study.user_attrs["array_jobs"]]
    log = (path.parent / f"runs/tiny/slurm_logs/optuna_submit_tiny_{job}.out").read_text()
    assert f"submitted array job {arrays[0]}" in log and "submitted finish job" in log
    wait_for_jobs(arrays)
    wait_until(lambda: (path.parent / "best_trial.yaml").exists(), what="the finish job's best_trial.yaml")
    assert len(finished(study)) == 2


@pytest.mark.slurm
def test_status_gives_no_eta_when_every_task_of_the_study_has_ended(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 2})
    control(path, "--no-submit_jobs")
    load_study(path).set_user_attr("array_jobs", [{"job_id": "999999", "tasks": 2}])  # long gone from the queue
    status = control(path, "--status").stdout
    assert "ETA: none, no worker is running or queued" in status and "2 trial(s) not covered" in status


def test_the_eta_of_trials_running_past_the_mean_time_is_their_end_not_a_second():
    start = datetime.datetime.now() - datetime.timedelta(minutes=5)
    done = optuna.trial.create_trial(value=1.0, user_attrs={"train_seconds": 60.0})
    running = [
        optuna.trial.FrozenTrial(n, optuna.trial.TrialState.RUNNING, None, start, None, {}, {}, {}, {}, {}, n)
        for n in (1, 2)
    ]
    line = status.eta_line([done, *running], 3, 2, None, 2)
    assert line.startswith("ETA: when the running trials end"), line
    assert status.eta_line([done, *running], 5, 2, None, 4).startswith("ETA: ~1m"), "two more trials of 60 s, 2 at once"


def test_status_shows_a_plain_objectives_last_reported_step(capsys):
    study = optuna.create_study()
    trial = study.ask()
    trial.report(0.25, 3)  # an objective's report writes no worker.log line
    status.print_running(study, study.get_trials())
    assert "step 3 (0.25)" in capsys.readouterr().out
