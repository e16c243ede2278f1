"""The walltime or preemption signal never lands inside library code: a plain objective stops at its next call
to Optuna, or at a deadline, between two storage operations."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from conftest import PROJECT, load_study
from optuna.storages.journal import JournalFileOpenLock
from test_objective import objective_experiment

import worker
from parallel_optuna import trial_control
from parallel_optuna.storage import journal
from parallel_optuna.storage.optuna_internals import get_lock_file


@pytest.fixture
def oblivious_objective_running():
    """This process as a worker whose plain objective has not asked stop_requested()."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)}
    stop = worker.StopSignal("trial_control.stop_requested()")
    stop.interrupt_now, stop.deadline = True, (600, lambda name: None)
    trial_control.Running.stop = stop
    yield stop
    trial_control.Running.stop = None
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def signal_me():
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.05)  # the handler runs here, in the middle of whatever this frame holds


def test_a_signal_inside_the_journal_lock_stops_the_objective_after_it(tmp_path, oblivious_objective_running):
    lock = JournalFileOpenLock(str(tmp_path / "journal.log"))
    with get_lock_file(lock):
        signal_me()
        assert (tmp_path / "journal.log.lock").exists(), "the lock is still ours"
    assert not (tmp_path / "journal.log.lock").exists()
    study = optuna.create_study()
    trial = worker.ObjectiveTrial(study, study.ask()._trial_id)
    with pytest.raises(trial_control.Stop):
        trial.report(1.0, 0)  # the objective's next call to Optuna is its safe point


def test_a_signal_during_a_replay_loses_no_op(tmp_path, oblivious_objective_running, monkeypatch):
    path = tmp_path / "journal.log"
    study = optuna.create_study(study_name="s", storage=journal.open_journal(path))
    for i in range(20):
        study.enqueue_trial({"x": float(i)})
    lines = {"n": 0}
    decode = journal.decode

    def decode_and_signal(line):
        lines["n"] += 1
        if lines["n"] == 10:
            signal_me()
        return decode(line)

    monkeypatch.setattr(journal, "decode", decode_and_signal)
    again = optuna.load_study(study_name="s", storage=optuna.storages.JournalStorage(journal.JournalFile(path)))
    assert lines["n"] >= 10 and len(again.get_trials()) == 20


def test_an_objective_without_a_safe_point_is_ended_at_the_deadline_with_its_state_whole(tmp_path):
    path = objective_experiment(tmp_path, "silent", {"study.n_trials": 1, "slurm.signal_grace": 4})
    process = subprocess.Popen(
        [sys.executable, str(PROJECT / "worker.py"), "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 60
    while not (path.parent / "runs/tiny/trials/0/config.yaml").exists():
        assert time.time() < deadline, "the trial never started"
        time.sleep(0.2)
    time.sleep(1)
    process.send_signal(signal.SIGUSR2)
    out, _ = process.communicate(timeout=30)
    assert "reached no safe point in 2 s: ending it" in out and "Traceback" not in out, out[-3000:]
    [trial] = load_study(path).trials
    assert trial.state.name == "FAIL" and trial.user_attrs["fail_reason"] == "interrupted by SIGUSR2"
