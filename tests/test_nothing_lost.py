"""Nothing lost: the study's one budget, the tasks liveness asked about, and retries linked as Optuna links them."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import PROJECT, finished, load_study, plugin_experiment, run_script
from slurm_helpers import squeue, wait_for_jobs
from test_objective import objective_experiment

from parallel_optuna import checkpoints, liveness
from parallel_optuna.config import load_config
from parallel_optuna.slurm import hostname


def wait_for(condition, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def checkpointed(path):
    """Trial numbers that have a checkpoint.pt."""
    return {int(p.parent.name) for p in (path.parent / "runs/tiny/trials").glob("*/checkpoint.pt")}


def test_best_export_keeps_the_checkpoints_that_the_next_run_continues_from(tmp_path):
    """The export judges "is the study finished?" with the budget the study remembers, not the YAML's n_trials."""
    path = plugin_experiment(tmp_path, {"study.n_trials": 1, "training.sleep": 0.3, "training.epochs": 20})
    assert run_script("submit_study.py", "--config", path, "--local", 1).returncode == 0
    command = [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path), "--local", "2"]
    launcher = subprocess.Popen([*command, "--n_trials", "3"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_for(lambda: len(checkpointed(path) - {0}) == 2, what="two trials with a checkpoint")
    launcher.send_signal(signal.SIGINT)  # Ctrl-C: both trials checkpoint and end as interrupted
    launcher.communicate(timeout=120)
    stopped = sorted(t.number for t in load_study(path).trials if t.state.name == "FAIL")
    assert len(stopped) == 2 and set(stopped) <= checkpointed(path)

    out = run_script("submit_study.py", "--config", path, "--export_best")
    assert out.returncode == 0, out.stdout + out.stderr
    assert set(stopped) <= checkpointed(path), "make best deleted the checkpoints the next run continues from"

    out = run_script("submit_study.py", "--config", path, "--local", 2, "--n_trials", 3, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    study = load_study(path)
    assert len(finished(study)) == 3
    for number in stopped:
        retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == number)
        log = (path.parent / f"runs/tiny/trials/{retry.number}/worker.log").read_text()
        assert f"continues from trial {number}'s checkpoint" in log and f"trial {retry.number} step 0:" not in log


def squeue_that_claims_a_trial(tmp_path, path):
    """A fake squeue: while it runs, a task of a job nobody asked about (999_0) claims a trial."""
    claim = (
        "import sys; sys.path.insert(0, sys.argv[1]); import optuna; from parallel_optuna.storage import journal; "
        "study = optuna.load_study(study_name='tiny', storage=journal.open_journal(sys.argv[2])); "
        "t = study.ask(); [t.set_user_attr(k, v) for k, v in "
        "{'slurm_task': '999_0', 'host': 'node-b', 'pid': 1}.items()]"
    )
    stub = tmp_path / "bin" / "squeue"
    stub.parent.mkdir()
    journal_file = path.parent / "runs/tiny/journal.log"
    stub.write_text(f"#!/bin/sh\n'{sys.executable}' -c \"{claim}\" '{PROJECT}' '{journal_file}' >&2\n")
    stub.chmod(0o755)
    return stub.parent


def test_status_spares_a_trial_claimed_by_a_job_it_did_not_ask_about(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 3})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    load_study(path).set_user_attr("array_jobs", [{"job_id": "5", "tasks": 3, "submitted_at": "2026-12-01T00:00:00"}])
    stubs = squeue_that_claims_a_trial(tmp_path, path)
    out = run_script("submit_study.py", "--config", path, "--status", env={"PATH": f"{stubs}:{os.environ['PATH']}"})
    assert out.returncode == 0, out.stdout + out.stderr
    claimed = load_study(path).trials[0]
    assert claimed.user_attrs["slurm_task"] == "999_0"
    assert claimed.state.name == "RUNNING", claimed.user_attrs.get("fail_reason")


@pytest.mark.slurm
def test_status_run_over_and_over_beside_a_hand_submitted_array_fails_no_live_trial(slurm, tmp_path):
    """Its tasks start while status lists jobs and re-reads trials: none may be judged dead while it trains."""
    path = plugin_experiment(tmp_path, {"study.n_trials": 6, "training.sleep": 0.3, "training.epochs": 3})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    sbatch = ["sbatch", "--parsable", "--array=0-5%2", str(path.parent / "runs/tiny/array_job.sbatch")]
    job = subprocess.run(sbatch, capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    looks = 0
    while squeue(f"--jobs={job}") or looks == 0:
        out = run_script("submit_study.py", "--config", path, "--status")
        assert out.returncode == 0, out.stdout + out.stderr
        looks += 1
    wait_for_jobs([job])
    trials = load_study(path).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6, [
        (t.number, t.user_attrs.get("fail_reason")) for t in trials
    ]
    assert looks >= 3, f"status ran {looks} time(s) while the array ran"


def test_a_worker_whose_trial_was_failed_under_it_keeps_its_result(tmp_path):
    """A mistaken "worker died" costs no result: it is stored, linked, and the retry queued for it is dropped."""
    path = plugin_experiment(tmp_path, {"study.n_trials": 2, "training.sleep": 0.5, "training.epochs": 8})
    worker = subprocess.Popen(
        [sys.executable, str(PROJECT / "worker.py"), "--config", str(path)], stdout=subprocess.PIPE, text=True
    )
    wait_for(lambda: 0 in checkpointed(path), what="the first checkpoint")
    study = load_study(path)
    victim = study.trials[0]
    assert liveness.fail_and_retry(study, victim, "worker died: judged dead by mistake", 2, 2)
    out, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "its result is kept as trial 2" in out, out[-3000:]
    kept = load_study(path).trials[2]
    assert kept.state.name == "COMPLETE" and kept.user_attrs["result_of"] == 0 and kept.user_attrs["retry_of"] == 0
    assert kept.system_attrs["retry_history"] == [0] and kept.params == victim.params
    assert (path.parent / "runs/tiny/trials/2/weights.pt").exists() or 2 in checkpointed(path)

    out = run_script("worker.py", "--config", path, "--trials", 0)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = load_study(path).trials
    assert "whose worker lived: its result is trial 2" in trials[1].user_attrs["fail_reason"]
    assert len(finished(load_study(path))) == 2, "the budget holds: the mistaken retry did not train"


def test_a_chain_of_two_deaths_resumes_from_the_first_trials_checkpoint(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 1, "training.sleep": 0.3, "training.epochs": 12})
    first = subprocess.Popen(
        [sys.executable, str(PROJECT / "worker.py"), "--config", str(path)], stdout=subprocess.DEVNULL
    )
    wait_for(lambda: 0 in checkpointed(path), what="trial 0's checkpoint")
    time.sleep(1)
    first.kill()
    first.wait()
    config, study = load_config(path), load_study(path)
    assert liveness.reconcile(study, config, tasks=None) == [0]
    retry = study.ask()  # its worker dies before its copy of trial 0's checkpoint lands
    for key, value in {"host": hostname(), "pid": dead_pid(), "pid_start": 1}.items():
        retry.set_user_attr(key, value)
    assert liveness.reconcile(study, config, tasks=None) == [retry.number]
    checkpoints.clean(study, config)
    assert 0 in checkpointed(path), "the chain's only checkpoint was deleted"

    out = run_script("worker.py", "--config", path)
    assert out.returncode == 0, out.stdout + out.stderr
    last = load_study(path).trials[-1]
    assert last.state.name == "COMPLETE" and f"trial {last.number} continues from trial 0's checkpoint" in out.stdout
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(last) == 0
    assert optuna.storages.RetryHeartbeatStaleTrialCallback.retry_history(last) == [0, retry.number]
    assert last.user_attrs["retry_of"] == retry.number and "slurm_task" not in last.user_attrs
    assert "fail_reason" not in last.user_attrs and last.user_attrs["pid"] != retry.user_attrs["pid"]


def test_an_objective_that_resumes_like_optuna_examples_continues_after_a_kill(tmp_path):
    path = objective_experiment(tmp_path, "resumes_like_optuna_examples", {"study.n_trials": 1})
    first = subprocess.Popen([sys.executable, str(PROJECT / "worker.py"), "--config", str(path)])
    checkpoint = path.parent / "checkpoints/0/model.json"
    wait_for(lambda: checkpoint.exists() and '"epoch": 3' in checkpoint.read_text(), what="3 epochs")
    first.send_signal(signal.SIGKILL)
    first.wait()
    out = run_script("worker.py", "--config", path)
    assert out.returncode == 0, out.stdout + out.stderr
    dead, retry = load_study(path).trials
    assert dead.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert retry.user_attrs["first_epoch"] >= 3, "the retry started over at epoch 0"


def test_idle_workers_of_a_small_space_wait_without_flooding_the_study(tmp_path):
    """Two configs, four workers: the two idle ones drop a few repeats of the running twins, then wait."""
    space = {"model.d_pos": {"type": "categorical", "choices": [2, 4]}}
    changes = {"search_space": space, "study.n_trials": 4, "training.sleep": 1.0, "training.epochs": 20}
    path = plugin_experiment(tmp_path, changes)
    out = run_script("submit_study.py", "--config", path, "--local", 4, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    trials = load_study(path).trials
    dropped = [t for t in trials if t.user_attrs.get("fail_reason", "").startswith("duplicate of running")]
    assert len(finished(load_study(path))) == 4
    assert len(dropped) <= 8, f"{len(dropped)} repeats of running trials dropped while two twins trained 20 s"


def test_slow_sacct_and_sbatch_are_one_line_not_a_traceback(monkeypatch, capsys):
    from parallel_optuna import slurm

    def no_answer(command, **kwargs):
        assert kwargs.get("timeout"), f"{command[0]} runs without a timeout"
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(subprocess, "run", no_answer)
    monkeypatch.setattr(slurm.shutil, "which", lambda name: f"/usr/bin/{name}")
    assert slurm.sacct_states(["5"]) == {}
    assert "sacct did not answer" in capsys.readouterr().out
    result = slurm.sbatch(["sbatch", "--parsable", "array_job.sbatch"])
    assert result.returncode == 1 and "may be queued all the same" in result.stderr


def test_files_written_at_once_by_two_writers_of_one_pid_never_collide(tmp_path):
    """Temporary names are unique, not per pid: nodes reuse pids, and threads share one."""
    import threading

    from parallel_optuna import config_versions

    errors = []

    def write(text):
        try:
            for _ in range(200):
                config_versions.write_atomic(tmp_path / "current.json", text)
        except OSError as e:
            errors.append(e)

    writers = [threading.Thread(target=write, args=(f'{{"w": {i}}}',)) for i in range(2)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert not errors and not list(tmp_path.glob(".current.json.*"))


def test_a_yaml_stamped_by_a_clock_behind_ours_is_read_once_it_settles(tmp_path):
    """mtimes come from the file server's clock: a file that looks 30 s old may be mid-edit all the same."""
    import threading

    from parallel_optuna import config_versions

    path = tmp_path / "config.yaml"

    def edit(text):
        path.write_text(text)
        past = time.time() - 30
        os.utime(path, (past, past))

    edit("study:\n")  # the editor's first write; the rest follows 0.3 s later
    later = threading.Timer(0.3, edit, args=("study:\n  n_trials: 5\n",))
    later.start()
    text = config_versions.read_settled(path, settle=1.0, timeout=10)
    later.join()
    assert text == "study:\n  n_trials: 5\n"


def test_a_lock_stamped_by_a_clock_behind_ours_is_not_stale_while_its_holder_lets_it_go(tmp_path):
    """A login node 40 s ahead of the file server sees a fresh lock as 40 s old: the lock is watched, not dated."""
    import threading

    from parallel_optuna.storage import journal_lock

    path = tmp_path / "journal.log"
    journal_lock.lock_path(path).touch()
    past = time.time() - 40
    os.utime(journal_lock.lock_path(path), (past, past))
    threading.Timer(1.0, journal_lock.lock_path(path).unlink).start()  # the live holder's append ends
    assert journal_lock.stale_lock(path) is None
    journal_lock.lock_path(path).touch()
    assert journal_lock.stale_lock(path, watch=1.0) is not None, "a lock nobody lets go of is stale after the watch"
