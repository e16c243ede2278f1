"""Weights and checkpoints on disk: the best model is exported, what nobody will read again is deleted."""

import copy
import socket
import subprocess
import types

import optuna
import pytest
import torch
import yaml
from conftest import finished, load_study, plugin_experiment, run_script, write_experiment

import worker
from examples import ishigami_lstm
from parallel_optuna import checkpoints, user_code
from parallel_optuna.config import load_config

X = optuna.distributions.FloatDistribution(0, 1)


def test_best_export_writes_the_best_trials_weights_and_the_rest_is_cleaned(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.keep_best": 1, "study.n_trials": 3})
    out = run_script("submit_study.py", "--config", path, "--local", 1)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    study = load_study(path)
    assert len(finished(study)) == 3
    trials = path.parent / "runs/tiny/trials"
    best = study.best_trial.number
    assert sorted(p.parent.name for p in trials.glob("*/*.pt")) == [str(best)], "only the best keeps a file"
    assert (trials / str(best) / "weights.pt").exists(), "its weights; its checkpoint went"

    exported = yaml.safe_load((path.parent / "best_trial.yaml").read_text())
    assert exported["best_trial"]["weights"] == str(path.parent / "best_trial.pt")
    weights = torch.load(path.parent / "best_trial.pt", weights_only=True)
    saved = torch.load(trials / str(best) / "weights.pt", weights_only=True)
    assert len(weights["models"]) == 2 and weights["dims"]["d_in"] == 1 + study.best_params["model.d_pos"]
    assert all(torch.equal(weights["models"][0][k], saved["models"][0][k]) for k in saved["models"][0])
    assert "disk: " in run_script("submit_study.py", "--config", path, "--status").stdout


def trial_with_files(study, path, state=None, value=None, names=("checkpoint.pt", "weights.pt"), attrs=None):
    trial = study.ask({"x": X})
    for key, v in (attrs or {}).items():
        trial.set_user_attr(key, v)
    folder = path.parent / "runs/tiny/trials" / str(trial.number)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        torch.save({"trial": trial.number}, folder / name)
    if state == "COMPLETE":
        study.tell(trial, value)
    elif state:
        study.tell(trial, state=optuna.trial.TrialState[state])
    return trial.number


def files_left(path):
    folder = path.parent / "runs/tiny/trials"
    return {(int(p.parent.name), p.name) for p in folder.glob("*/*") if p.suffix in (".pt", ".partial")}


def test_cleanup_keeps_running_best_and_retry_sources_and_deletes_the_rest(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.keep_best": 2})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    study, config = load_study(path), load_config(path)
    best = trial_with_files(study, path, "COMPLETE", 0.1)
    second = trial_with_files(study, path, "COMPLETE", 0.2, names=("checkpoint.pt",))  # no weights saved
    dominated = trial_with_files(study, path, "COMPLETE", 0.9)
    pruned = trial_with_files(study, path, "PRUNED")
    half_written = trial_with_files(study, path, "FAIL", names=("checkpoint.partial",))  # killed mid-save
    running = trial_with_files(study, path)
    copied = trial_with_files(study, path, "FAIL")  # its retry runs and has copied the checkpoint
    study.enqueue_trial({"x": 0.5}, user_attrs={"retry_of": copied})
    retry = study.ask()
    (path.parent / "runs/tiny/trials" / str(retry.number)).mkdir(parents=True)
    torch.save({}, path.parent / "runs/tiny/trials" / str(retry.number) / "checkpoint.pt")
    failed = trial_with_files(study, path, "FAIL")  # a crash, or liveness is about to enqueue its retry
    waited_for = trial_with_files(study, path, "FAIL")  # its retry waits
    study.enqueue_trial({"x": 0.5}, user_attrs={"retry_of": waited_for})
    before = files_left(path)

    checkpoints.clean(study, config)
    assert files_left(path) == before - {
        (best, "checkpoint.pt"),
        (dominated, "checkpoint.pt"),
        (dominated, "weights.pt"),
        (pruned, "checkpoint.pt"),
        (pruned, "weights.pt"),
        (half_written, "checkpoint.partial"),
        (copied, "checkpoint.pt"),
        (copied, "weights.pt"),
    }
    assert {(second, "checkpoint.pt"), (running, "weights.pt"), (waited_for, "checkpoint.pt")} <= files_left(path)
    assert {(failed, "checkpoint.pt"), (retry.number, "checkpoint.pt")} <= files_left(path)

    # The study finishes: what only a retry could have read goes, the best stay.
    study.tell(running, 0.3)
    study.tell(retry, 0.4)
    study.tell(study.ask(), 0.5)  # the waiting retry
    checkpoints.clean(study, config)
    assert files_left(path) == {(best, "weights.pt"), (second, "checkpoint.pt")}


def test_a_workers_clean_in_a_large_study_leaves_what_a_full_clean_would(tmp_path):
    """A worker looks only at the trials that can have changed; at 10,000 trials that is what keeps it fast."""
    path = write_experiment(tmp_path / "exp", {"study.keep_best": 1, "study.n_trials": 10_000})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    study, config = load_study(path, "tiny"), load_config(path)
    old_best = trial_with_files(study, path, "COMPLETE", 0.1)
    slow = study.ask({"x": X})  # it trains on while many shorter trials come and go
    for _ in range(checkpoints.RECENT + 20):
        study.tell(study.ask({"x": X}), 1.0)
    folder = path.parent / "runs/tiny/trials" / str(slow.number)
    folder.mkdir(parents=True)
    torch.save({}, folder / "checkpoint.pt")
    checkpoints.clean(study, config, everything=False)
    assert (old_best, "weights.pt") in files_left(path), "the best keeps its weights"
    study.tell(slow, 2.0)
    new_best = trial_with_files(study, path, "COMPLETE", 0.05)
    checkpoints.clean(study, config, everything=False)
    assert files_left(path) == {(new_best, "weights.pt")}, "the pushed-out best and the slow trial's files went"
    assert checkpoints.clean(study, config) == (0, 0), "a full clean finds nothing more"


def test_a_walltime_signal_before_the_first_save_still_gets_its_checkpoint(tmp_path):
    """The signal may come while the worker starts: a trainer that reports, then saves, still saves first."""
    study = optuna.create_study()
    stop = types.SimpleNamespace(received="SIGUSR2")
    handle = worker.TrialHandle(study.ask(), tmp_path, stop)
    handle.report(0.5, 0)  # the first epoch's report: the trainer has yet to save
    with pytest.raises(worker.Interrupted):
        handle.save_checkpoint({"epoch": 0})
    assert torch.load(handle.checkpoint, weights_only=True) == {"epoch": 0}, "saved before the stop"
    never_saves = worker.TrialHandle(study.ask(), tmp_path, stop)
    never_saves.report(0.5, 0)
    with pytest.raises(worker.Interrupted):
        never_saves.report(0.4, 1)  # a trainer that does not checkpoint stops at its next report


def test_a_stop_in_the_last_epoch_still_returns_its_metrics_after_the_requeue(tmp_path):
    """The example trainer keeps its metrics in the checkpoint: the run after the requeue has no epoch left."""
    path = write_experiment(tmp_path / "exp", {"training.epochs": 1})
    config = load_config(path)
    user_code.prepare_data(config)
    resolved = ishigami_lstm.update_config(copy.deepcopy(dict(config)))
    study = optuna.create_study()
    trial = study.ask()
    stopped = worker.TrialHandle(trial, tmp_path, types.SimpleNamespace(received="SIGUSR2"))
    with pytest.raises(worker.Interrupted):
        ishigami_lstm.train(resolved, stopped)  # its one epoch, saved, then the stop
    again = worker.TrialHandle(trial, tmp_path, types.SimpleNamespace(received=None))
    assert "val_mae_mean" in ishigami_lstm.train(resolved, again)


class RunsCode:
    """What a swapped checkpoint.pt could hold: unpickling it calls `touch <marker>`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


def swapped_checkpoint_resumed(path):
    """A retry resumes from trial 0's checkpoint.pt, which someone replaced; returns (the retry, the marker)."""
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    study = load_study(path)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # trial 0: its worker died
    folder = path.parent / "runs/tiny/trials/0"
    folder.mkdir(parents=True, mode=0o700)
    marker = path.parent / "marker"
    torch.save({"epoch": 1, "extra": RunsCode(marker)}, folder / "checkpoint.pt")
    study.enqueue_trial({"model.d_pos": 2, "training.lr": 0.01}, user_attrs={"retry_of": 0})
    out = run_script("worker.py", "--config", path)
    return out, load_study(path).trials[1], marker


def test_a_swapped_checkpoint_is_loaded_as_data_and_runs_nothing(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 1, "training.sleep": 0.01, "training.epochs": 2})
    out, retry, marker = swapped_checkpoint_resumed(path)
    assert not marker.exists(), "the pickle's callable ran"
    assert retry.state.name == "FAIL", out.stdout[-2000:]
    reason = retry.user_attrs["fail_reason"]
    assert "UntrustedCheckpoint" in reason and "study.trusted_checkpoints: true" in reason, reason
    assert str(path.parent / "runs/tiny/trials/1/checkpoint.pt") in reason and "it would call " in reason, reason


def test_trusted_checkpoints_load_the_trainers_own_objects(tmp_path):
    changes = {"study.n_trials": 1, "training.sleep": 0.01, "training.epochs": 2, "study.trusted_checkpoints": True}
    out, retry, marker = swapped_checkpoint_resumed(plugin_experiment(tmp_path, changes))
    assert retry.state.name == "COMPLETE", out.stdout[-2000:]
    assert marker.exists(), "a full pickle, as the key says"


def test_status_only_reads_the_files_and_says_what_it_failed_while_export_says_what_it_deleted(tmp_path):
    """A command that reads does not delete files; the one write status makes (failing a dead trial) it says."""
    path = write_experiment(tmp_path / "exp", {"study.keep_best": 1})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    study = load_study(path)
    trial_with_files(study, path, "COMPLETE", 0.1)
    dominated = trial_with_files(study, path, "COMPLETE", 0.9)
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = trial_with_files(study, path, attrs={"host": socket.gethostname(), "pid": gone.pid, "pid_start": "1"})
    before = files_left(path)

    status = run_script("submit_study.py", "--config", path, "--status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert files_left(path) == before, "status deletes nothing"
    said = [line for line in status.stdout.splitlines() if line.startswith(f"marked trial {dead} FAIL")]
    assert said == [
        f"marked trial {dead} FAIL (worker died: pid {gone.pid} on {socket.gethostname()} is gone); "
        f"its retry is trial {dead + 1}"
    ], status.stdout

    export = run_script("submit_study.py", "--config", path, "--export_best")
    assert export.returncode == 0, export.stdout + export.stderr
    assert (dominated, "weights.pt") not in files_left(path)
    assert "checkpoint/weights file(s) that no trial will read again" in export.stdout
