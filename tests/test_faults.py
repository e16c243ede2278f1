"""Nothing lost, nothing stuck, nothing twice: faults injected into real arrays on the local cluster.

Each scenario ends with the study's promise: exactly the budget finished, nothing RUNNING or
WAITING, no array task with two live trials, and every retry linked to the trial it replaces.
"""

import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import enqueue, finished, load_study, plugin_experiment, run_script
from slurm_helpers import submitted_jobs, wait_for_jobs, wait_until

import worker
from parallel_optuna import report
from parallel_optuna.config import load_config
from parallel_optuna.study import open_storage, open_study

pytestmark = pytest.mark.slurm
SLOW = {"training.sleep": 1.0, "training.epochs": 6}


def submit(path, *flags):
    out = run_script("submit_study.py", "--config", path, *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    return submitted_jobs(out.stdout)


def assert_study_whole(study, budget, per_task=1):
    trials = study.get_trials()
    assert len(finished(study)) == budget, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    # A task finishes its trials (slurm.trials_per_task), and a dead task's share for each dead trial it failed.
    finished_tasks = Counter(t.user_attrs["slurm_task"] for t in finished(study) if t.user_attrs.get("slurm_task"))
    extra = sum(max(0, n - per_task) for n in finished_tasks.values())
    deaths = sum(t.user_attrs.get("fail_reason", "").startswith("worker died") for t in trials)
    assert extra <= deaths * per_task, (finished_tasks, deaths)  # a packed task may die before all its trials
    by_number = {t.number: t for t in trials}
    for t in trials:
        if "retry_of" in t.user_attrs:
            origin = by_number[t.user_attrs["retry_of"]]
            assert origin.state.name == "FAIL" and origin.params == t.params
        if t.state.name == "FAIL":
            assert t.user_attrs.get("fail_reason")
    retried = Counter(t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs and t.state.name != "FAIL")
    assert not retried or max(retried.values()) == 1, "a dead trial was retried twice"


def running_trial_with_checkpoint(path, besides=()):
    study = load_study(path)

    def find():
        for t in study.get_trials():
            if t.state.name == "RUNNING" and "pid" in t.user_attrs and t.number not in besides:
                if (path.parent / "runs/tiny/trials" / str(t.number) / "checkpoint.pt").exists():
                    return t

    return wait_until(find, what="a running trial with a checkpoint")


def test_kill_9_of_a_worker_is_retried_within_the_array(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {**SLOW, "study.n_trials": 4, "slurm.max_concurrent_jobs": 2})
    jobs = submit(path)
    victim = running_trial_with_checkpoint(path)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    wait_for_jobs(jobs)
    study = load_study(path)
    assert_study_whole(study, 4)
    dead = study.trials[victim.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["fail_reason"].startswith("worker died")
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == victim.number)
    assert sorted(retry.intermediate_values) == list(range(6)), "the retry continued the dead trial's curve"


def test_kill_9_of_a_packed_task_mid_trial_is_retried_within_the_array(slurm, tmp_path):
    """slurm.trials_per_task 2: 6 trials in 3 tasks, 2 at once; the killed task's trial is retried by the third."""
    changes = {**SLOW, "study.n_trials": 6, "slurm.max_concurrent_jobs": 2, "slurm.trials_per_task": 2}
    path = plugin_experiment(tmp_path, changes)
    jobs = submit(path)
    victim = running_trial_with_checkpoint(path)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    wait_for_jobs(jobs)
    study = load_study(path)
    assert_study_whole(study, 6, per_task=2)
    assert study.trials[victim.number].user_attrs["fail_reason"].startswith("worker died")
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == victim.number)
    assert retry.user_attrs["slurm_task"] != victim.user_attrs["slurm_task"], "the killed task ran no more"
    assert sorted(retry.intermediate_values) == list(range(6)), "the retry continued the dead trial's curve"


def test_scancel_of_one_task_mid_trial(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {**SLOW, "study.n_trials": 4, "slurm.max_concurrent_jobs": 2})
    jobs = submit(path)
    victim = running_trial_with_checkpoint(path)
    subprocess.run(["scancel", victim.user_attrs["slurm_task"]], check=True)
    wait_for_jobs(jobs)
    study = load_study(path)
    if len(finished(study)) < 4:  # the cancelled task was in the last wave: nobody started after it
        wait_for_jobs(submit(path))
        study = load_study(path)
    assert_study_whole(study, 4)
    assert study.trials[victim.number].user_attrs["fail_reason"].startswith("worker died")


def test_walltime_requeue_touches_only_its_own_task(slurm, tmp_path):
    # Three tasks at once, each with 40 s of training in a 1-minute walltime: SLURM's USR2 comes 5-35 s in
    # (it checks limits every 30 s and signals once the end is within signal_grace + 30 s: with more than
    # 30 s of a minute, at the first check, which may come before the task's shell has its trap). The task
    # that runs under the array's own job id checkpoints every 0.5 s, the others every 5 s: it requeues
    # itself first, while they are mid-step. Requeueing by that job id would requeue (and SIGTERM) every
    # task of the array.
    path = plugin_experiment(
        tmp_path,
        {
            "training.sleep": 5.0,
            "training.epochs": 8,
            "training.fine_steps_on_array_id": 10,
            "study.n_trials": 3,
            "slurm.max_concurrent_jobs": 3,
            "slurm.walltime": "1",
            "slurm.signal_grace": 25,
        },
    )
    wait_for_jobs(submit(path), timeout=500)
    study, config = load_study(path), load_config(path)
    assert_study_whole(study, 3)
    done = finished(study)
    holder = [t for t in done if t.user_attrs["slurm_job_id"] == t.user_attrs["slurm_array_job_id"]]
    assert len(holder) == 1, "one task of the array runs under the array's own job id"
    for t in done:
        assert t.user_attrs.get("requeues", 0) >= 1, f"trial {t.number} outlived its walltime"
        restarts = t.user_attrs["slurm_restart_count"]
        assert restarts == t.user_attrs["requeues"], f"trial {t.number}: {restarts} restarts, not all its own"
        assert sorted(t.intermediate_values) == list(range(80 if t in holder else 8)), "it resumed every time"
        events = [line for line in Path(t.user_attrs["slurm_out"]).read_text().splitlines() if "step" not in line]
        own_requeue = ("requeueing its task", "requeued: it resumes", "SIGTERM received")
        for before, line in zip(events, events[1:], strict=False):  # only its own requeue stops a task
            if "SIGTERM received" in line:
                assert any(said in before for said in own_requeue), events
        assert "resumes from" in Path(t.user_attrs["log_path"]).read_text()
        assert len(report.requeue_gaps(t, config)) == t.user_attrs["requeues"], "the report marks every requeue"


def test_a_requeued_packed_task_runs_only_the_rest_of_its_share(slurm, tmp_path):
    """slurm.trials_per_task 2: the walltime signal in each of the first task's trials requeues it twice. It resumes
    each trial and runs 2 in all, not 2 per run. The second task is held meanwhile, so the budget leaves room to
    overrun."""
    # Short epochs, 5.5 s from the first checkpoint to the last: the signal lands between them on a busy machine.
    changes = {"training.sleep": 0.5, "training.epochs": 12, "study.n_trials": 4, "slurm.trials_per_task": 2}
    # One task at a time; every trial trains, a repeated config too (not answered from its twin).
    path = plugin_experiment(tmp_path, {**changes, "slurm.max_concurrent_jobs": 1, "study.allow_repeats": True})
    [job] = submit(path)
    first_task, second_task = f"{job}_0", f"{job}_1"
    subprocess.run(["scontrol", "hold", second_task], check=True)
    signalled = []
    for _ in range(2):  # in its first trial, then in its second
        trial = running_trial_with_checkpoint(path, besides=signalled)
        assert trial.user_attrs["slurm_task"] == first_task
        subprocess.run(["scancel", "--batch", "--signal=USR2", first_task], check=True)  # as SLURM's B:USR2
        signalled.append(trial.number)
    wait_for_jobs([first_task])
    subprocess.run(["scontrol", "release", second_task], check=True)
    wait_for_jobs([job])
    trials = load_study(path).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, [(t.number, t.state.name, t.user_attrs) for t in trials]
    ran = Counter(t.user_attrs.get("slurm_task") for t in trials)
    assert ran == {first_task: 2, second_task: 2}, "each task ran its share, once"
    assert not [t for t in trials if "retry_of" in t.user_attrs], "no trial ran twice"
    for number in signalled:
        t = trials[number]
        assert t.user_attrs["requeues"] == 1, t.user_attrs
        assert sorted(t.intermediate_values) == list(range(12)), "it resumed, not restarted"
        assert "resumes from" in Path(t.user_attrs["log_path"]).read_text()


def test_a_requeued_task_still_runs_the_share_it_took_over_from_a_dead_task(slurm, tmp_path):
    """A packed task (2 trials) that took over a dead task's share (2 more) is requeued in its third trial: the
    new run resumes it and runs the fourth, rather than stop at its own 2."""
    path = plugin_experiment(tmp_path, {"training.sleep": 0.1, "training.epochs": 2, "slurm.trials_per_task": 2})
    study = enqueue(path)
    hold = ["sbatch", "--parsable", "--hold", "--array=0", "--output=/dev/null", "--wrap=true"]
    job = subprocess.run(hold, capture_output=True, text=True, check=True).stdout.strip()  # alive for squeue
    task = f"{job}_0"
    try:
        for _ in range(3):  # as its earlier runs left them: 2 finished, the third running
            trial = study.ask()
            trial.set_user_attr("slurm_task", task)
            trial.set_user_attr("slurm_task_share", 4)
        study.tell(0, 0.5)
        study.tell(1, 0.5)
        requeued = {
            "SLURM_ARRAY_JOB_ID": job,
            "SLURM_ARRAY_TASK_ID": "0",
            "SLURM_JOB_ID": job,
            "SLURM_RESTART_COUNT": "1",
        }
        out = run_script("worker.py", "--config", path, "--trials", 2, env=requeued)
    finally:
        subprocess.run(["scancel", job], check=True)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "resuming trial 2 after a requeue" in out.stdout
    trials = load_study(path).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, [(t.number, t.state.name) for t in trials]
    assert {(t.user_attrs["slurm_task"], t.user_attrs["slurm_task_share"]) for t in trials} == {(task, 4)}


def test_node_down_while_tasks_run_then_resumed(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {**SLOW, "study.n_trials": 3, "slurm.max_concurrent_jobs": 3})
    jobs = submit(path)
    running_trial_with_checkpoint(path)
    pids = [t.user_attrs["pid"] for t in load_study(path).get_trials() if t.state.name == "RUNNING"]
    subprocess.run(["scontrol", "update", f"nodename={slurm}", "state=down", "reason=test"], check=True)
    # SLURM requeues the node's jobs at once; the node comes back once their processes are gone
    wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in pids), what="the killed workers to exit")
    time.sleep(1)
    subprocess.run(["scontrol", "update", f"nodename={slurm}", "state=resume"], capture_output=True)
    wait_for_jobs(jobs, timeout=400)
    study = load_study(path)
    if len(finished(study)) < 3:
        wait_for_jobs(submit(path))
        study = load_study(path)
    assert_study_whole(study, 3)
    resumed = [t for t in finished(study) if t.user_attrs["slurm_restart_count"] >= 1]
    assert resumed, "the tasks killed with the node ran again and finished their trials"
    assert all(sorted(t.intermediate_values) == list(range(6)) for t in resumed)
    assert any("resumes from" in Path(t.user_attrs["log_path"]).read_text() for t in resumed)
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    for t in resumed:
        line = f"task {t.user_attrs['slurm_task']}: NODE_FAIL after "
        assert line in status and f"SLURM requeued the task, and trial {t.number} resumed" in status, status


def test_nan_and_exception_fail_their_trials_and_the_rest_finish(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 3, "training.misbehave": True})
    enqueue(path, {"model.d_pos": 2, "training.lr": 0.01}, {"model.d_pos": 4, "training.lr": 0.01})
    wait_for_jobs(submit(path))
    wait_for_jobs(submit(path))  # failed trials do not count: the top-up runs the missing ones
    study = load_study(path)
    assert_study_whole(study, 3)
    reasons = sorted(t.user_attrs["fail_reason"] for t in study.trials if t.state.name == "FAIL")
    assert reasons[0].startswith("RuntimeError: boom") and "metric is nan" in reasons[1]
    # Once the budget is met, a further task exits at once without a trial.
    script = path.parent / "runs/tiny/array_job.sbatch"
    job = subprocess.run(
        ["sbatch", "--parsable", "--array=0", str(script)], capture_output=True, text=True, check=True
    ).stdout.strip()
    wait_for_jobs([job])
    assert (
        "budget of 3 finished trials is covered"
        in (path.parent / f"runs/tiny/slurm_logs/optuna_{job}_0.out").read_text()
    )
    assert len(load_study(path).trials) == len(study.trials)


def test_an_array_stops_starting_trials_once_the_trainer_fails_every_one_the_same_way(slurm, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 6, "training.broken": True})
    wait_for_jobs(submit(path))
    study = load_study(path)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert 3 <= len(failed) <= 4 and len(study.trials) == len(failed), "the tasks after the third failure train nothing"
    logs = "".join(p.read_text() for p in (path.parent / "runs/tiny/slurm_logs").glob("*.out"))
    assert "all failed in the trainer, the last with (KeyError: \"no column 'target'" in logs, logs[-3000:]
    assert "this task starts no new trial; fix it, then submit again" in logs
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert "array tasks start no new trial until a submit" in status and "fix the trainer, then submit again" in status
    # An array submitted by hand after those failures tries one trial (the fix may be a package), then stops.
    script = path.parent / "runs/tiny/array_job.sbatch"
    by_hand = subprocess.run(["sbatch", "--parsable", "--array=0-2%1", str(script)], capture_output=True, text=True)
    wait_for_jobs([by_hand.stdout.strip()])
    assert len(load_study(path).trials) == len(failed) + 1, "one trial, then the other tasks stop"
    path.write_text(path.read_text().replace("broken: true", "broken: false"))  # the fix
    wait_for_jobs(submit(path))
    assert len(finished(load_study(path))) == 6, "fixed and submitted again, the study runs"


def test_a_requeue_that_fails_is_a_warning_and_the_trial_goes_on(slurm, tmp_path, monkeypatch):
    path = plugin_experiment(tmp_path)
    config = load_config(path)
    study = open_study(config, open_storage(config))
    trial = study.ask()
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "999999")  # a task SLURM does not know: scontrol refuses it
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    assert worker.requeue_or_fail(study, trial, config, "SIGUSR2") is worker.Outcome.STOPPED
    left = load_study(path).trials[0]
    assert left.state.name == "RUNNING" and left.user_attrs["requeues"] == 1, "left for the reconcile to retry"
    assert "scontrol requeue 999999_0 exited" in worker.requeue_task("999999_0")
