"""Dead-worker detection and retries, raced by several processes on the default journal storage."""

import multiprocessing
import subprocess
import sys
import time

import optuna
from conftest import PROJECT, load_study, plugin_experiment, run_script

from parallel_optuna import liveness
from parallel_optuna.config import Config
from parallel_optuna.slurm import hostname

CONFIG = Config({"study": {"max_retries": 2, "n_trials": 10}}, "config.yaml")


def dead_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def reconcile_in_child(path, barrier, results):
    study = load_study(path)
    barrier.wait()
    results.put(liveness.reconcile(study, CONFIG, tasks=None))


def test_racing_reconcilers_retry_a_dead_trial_exactly_once(experiment):
    assert run_script("submit_study.py", "--config", experiment, "--no-submit_jobs").returncode == 0
    study = load_study(experiment)
    for _ in range(5):
        trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
        for key, value in {"host": hostname(), "pid": dead_pid(), "pid_start": 1}.items():
            trial.set_user_attr(key, value)
        barrier, results = multiprocessing.Barrier(4), multiprocessing.Queue()
        racers = [
            multiprocessing.Process(target=reconcile_in_child, args=(experiment, barrier, results)) for _ in range(4)
        ]
        for p in racers:
            p.start()
        claims = [results.get(timeout=60) for _ in racers]
        for p in racers:
            p.join()
        assert sorted(map(len, claims)) == [0, 0, 0, 1], "exactly one process failed the dead trial"
        trials = study.get_trials()
        retries = [t for t in trials if t.user_attrs.get("retry_of") == trial.number]
        assert len(retries) == 1 and retries[0].state.name == "WAITING"
        assert (
            study.trials[trial.number]
            .user_attrs["fail_reason"]
            .startswith(f"worker died: pid {trial.user_attrs['pid']}")
        )
        # the retry is consumed so that the next round starts from a clean study
        retry = study.ask()
        study.tell(retry, 1.0)


def test_live_and_unknown_workers_are_left_alone(experiment):
    assert run_script("submit_study.py", "--config", experiment, "--no-submit_jobs").returncode == 0
    study = load_study(experiment)
    live = study.ask()
    me = subprocess.Popen(["sleep", "30"])
    try:
        live.set_user_attr("host", hostname())
        live.set_user_attr("pid", me.pid)
        live.set_user_attr("pid_start", liveness.process_start(me.pid))
        elsewhere = study.ask()
        elsewhere.set_user_attr("host", "another-node")
        elsewhere.set_user_attr("pid", 1)
        in_slurm = study.ask()
        in_slurm.set_user_attr("slurm_task", "77_3")
        assert liveness.reconcile(study, CONFIG, tasks=None) == [], "squeue unreachable: nobody is declared dead"
        running = liveness.Tasks({"77"}, {"77_3": ("RUNNING", "1:00", "None")})
        assert liveness.reconcile(study, CONFIG, tasks=running) == []
        pending = liveness.Tasks({"77"}, {"77_3": ("PENDING", "0:00", "BeginTime")})
        assert liveness.reconcile(study, CONFIG, tasks=pending) == []
        asked_elsewhere = liveness.Tasks({"76"})  # a map of other jobs cannot vouch for the absence of 77_3
        assert liveness.reconcile(study, CONFIG, tasks=asked_elsewhere) == []
        assert liveness.reconcile(study, CONFIG, tasks=liveness.Tasks({"77"})) == [in_slurm.number]
    finally:
        me.kill()
    assert [t.state.name for t in study.get_trials()][:3] == ["RUNNING", "RUNNING", "FAIL"]


def test_retries_stop_at_max_retries(experiment):
    assert run_script("submit_study.py", "--config", experiment, "--no-submit_jobs").returncode == 0
    study = load_study(experiment)
    study.enqueue_trial({"model.d_pos": 4}, user_attrs={"retry_of": 0, "retry_attempt": 2})
    trial = study.ask()
    trial.set_user_attr("slurm_task", "5_0")
    assert liveness.reconcile(study, CONFIG, tasks=liveness.Tasks({"5"})) == [trial.number]
    assert [t.state.name for t in study.get_trials()] == ["FAIL"], "attempt 2 of max_retries 2: no third retry"


def test_rdb_heartbeat_fails_and_retries_a_silent_trial(tmp_path):
    """On SQLite/PostgreSQL, Optuna's heartbeat finds dead workers that neither SLURM nor a pid can vouch for."""
    url = f"sqlite:///{tmp_path}/heartbeat.db"
    changes = {"study.storage": url, "study.heartbeat_interval": 1, "study.grace_period": 3, "study.n_trials": 1}
    path = plugin_experiment(tmp_path, {**changes, "training.sleep": 1.0, "training.epochs": 5})
    worker = subprocess.Popen(
        [sys.executable, str(PROJECT / "worker.py"), "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = path.parent / "runs/tiny/trials/0/checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    worker.kill()
    worker.wait()
    study = optuna.load_study(study_name="tiny", storage=url)
    # as if it had run on another machine without SLURM: only the missing heartbeat tells
    optuna.trial.Trial(study, study.trials[0]._trial_id).set_user_attr("host", "another-node")
    time.sleep(4)
    out = run_script("worker.py", "--config", path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    dead, retry = study.get_trials()
    assert dead.state.name == "FAIL" and retry.state.name == "COMPLETE"
    assert retry.user_attrs["retry_of"] == 0 and retry.params == dead.params
    assert sorted(retry.intermediate_values) == list(range(5)), "the retry continued from the checkpoint"


def test_a_retry_enqueued_twice_runs_once(experiment):
    """SQLite can let two processes both fail a dead trial and both enqueue its retry: only one runs."""
    assert run_script("submit_study.py", "--config", experiment, "--no-submit_jobs", "--n_trials", 2).returncode == 0
    study = load_study(experiment)
    dead = study.ask()
    study.tell(dead, state=optuna.trial.TrialState.FAIL)
    for _ in range(2):
        study.enqueue_trial({"model.d_pos": 6, "training.lr": 0.01}, user_attrs={"retry_of": 0, "retry_attempt": 1})
    out = run_script("worker.py", "--config", experiment, "--trials", 0, "--n_trials", 2)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].user_attrs["fail_reason"] == "duplicate retry of trial 0"
    assert "retry_of" not in trials[3].user_attrs
