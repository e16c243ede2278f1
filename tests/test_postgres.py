"""PostgreSQL storage, for real: a local server (scripts/local_postgres.sh), one fresh database per test.

PostgreSQL is the storage for workers beyond one filesystem (docs/storage.md); these tests run arrays against it.
"""

import os
import signal
import time

import optuna
import pytest
from conftest import finished, plugin_experiment, run_script
from slurm_helpers import wait_for_jobs
from test_faults import SLOW, assert_study_whole, running_trial_with_checkpoint, submit

import worker
from parallel_optuna import liveness
from parallel_optuna.config import load_config
from parallel_optuna.search_space import sample_params
from parallel_optuna.study import open_storage, open_study


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # ask/tell with heartbeats, as worker.py does
def test_a_silent_trial_is_failed_and_retried_once_by_heartbeat_and_squeue(postgres_db, tmp_path):
    """Both dead-worker checks see the same trial: it fails once, with a reason, and its retry runs unharmed."""
    path = plugin_experiment(
        tmp_path, {"study.storage": postgres_db, "study.heartbeat_interval": 1, "study.grace_period": 2}
    )
    config = load_config(path)
    study = open_study(config, open_storage(config, postgres_db))
    dead = study.ask()
    sample_params(dead, config["search_space"])
    for key, value in {"slurm_task": "5_0", "host": "node-a", "pid": 1}.items():
        dead.set_user_attr(key, value)
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3)  # past grace_period: the heartbeat check finds it; squeue no longer lists 5_0
    assert liveness.fail_stale(study, config) == [0]
    assert liveness.reconcile(study, config, tasks=liveness.Tasks({"5"})) == []
    retry = worker.claim_trial(study, config)
    sample_params(retry, config["search_space"])  # the enqueued params
    gone = liveness.Tasks({"5"})  # squeue was asked about job 5 and lists none of its tasks
    assert liveness.reconcile(study, config, tasks=gone) == [], "the retry does not inherit the dead task"
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING"]
    assert trials[0].user_attrs["fail_reason"].startswith("worker died: no heartbeat")
    assert retry.number == 1 and trials[1].user_attrs == {"retry_of": 0, "retry_attempt": 1}
    assert trials[1].params == trials[0].params


@pytest.mark.slurm
def test_an_array_runs_end_to_end_on_postgres(slurm, postgres_db, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 4, "slurm.max_concurrent_jobs": 2})
    out = run_script("submit_study.py", "--config", path, "--storage", postgres_db)
    assert out.returncode == 0, out.stdout + out.stderr
    assert postgres_db.split("@")[0] not in out.stdout, "the password is masked"
    wait_for_jobs([line.split()[3].rstrip(":") for line in out.stdout.splitlines() if "submitted array" in line])
    study = optuna.load_study(study_name="tiny", storage=postgres_db)
    assert_study_whole(study, 4)
    assert {t.user_attrs["slurm_task"].split("_")[0] for t in finished(study)} != {None}
    assert not (path.parent / "runs/tiny/journal.log").exists(), "nothing went to the journal file"
    status = run_script("submit_study.py", "--config", path, "--storage", postgres_db, "--status")
    assert status.returncode == 0 and "COMPLETE" in status.stdout, status.stdout + status.stderr


@pytest.mark.slurm
def test_kill_9_of_a_worker_is_retried_once_on_postgres(slurm, postgres_db, tmp_path):
    # A 1 s heartbeat and 3 s grace: Optuna's heartbeat check and squeue may both see the dead worker.
    changes = {"study.storage": postgres_db, "study.heartbeat_interval": 1, "study.grace_period": 3}
    path = plugin_experiment(tmp_path, {**SLOW, **changes, "study.n_trials": 4, "slurm.max_concurrent_jobs": 2})
    jobs = submit(path)
    victim = running_trial_with_checkpoint(path)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    wait_for_jobs(jobs)
    study = optuna.load_study(study_name="tiny", storage=postgres_db)
    assert_study_whole(study, 4)
    dead = study.trials[victim.number]
    assert dead.state.name == "FAIL" and dead.user_attrs["fail_reason"].startswith("worker died")
    retries = [t for t in study.trials if t.user_attrs.get("retry_of") == victim.number]
    assert [t.state.name for t in retries] == ["COMPLETE"], [(t.number, t.state.name, t.user_attrs) for t in retries]
    assert sorted(retries[0].intermediate_values) == list(range(6)), "the retry continued the dead trial's curve"
    assert [t.state.name for t in study.trials].count("FAIL") == 1, "nothing but the dead trial failed"
