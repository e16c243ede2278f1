"""What a plain Optuna objective may ask while it runs as an array task: where its trial's files go,
where its artifacts go, and whether to stop. The same objective still runs unchanged under `study.optimize`.

    from parallel_optuna import trial_control
    def objective(trial):
        lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        checkpoint = trial_control.trial_dir(trial) / "checkpoint.pt"
        state = torch.load(checkpoint, weights_only=True) if checkpoint.exists() else {"epoch": 0, "val_loss": None}
        for epoch in range(state["epoch"], 100):
            ...                                        # train one epoch
            trial.report(val_loss, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()
            state = {"epoch": epoch + 1, "val_loss": val_loss, ...}
            if trial_control.stop_requested():         # walltime or preemption: save, then stop
                torch.save(state, checkpoint)
                raise trial_control.Stop()
        return state["val_loss"]                       # the last epoch's, after a stop in it too

After a Stop, the array task is requeued and the same trial (same params, same folder) runs the
objective again, which continues from its checkpoint; a retry of a dead trial gets a copy of the
dead trial's `checkpoint.pt` (name it so). An objective that asks neither is stopped at its next report,
should_prune or suggest call (or after half of slurm.signal_grace), and runs again from the start, with the
same params, after the requeue.
"""

import functools
import tempfile
from pathlib import Path

import optuna
import optuna.artifacts


class Stop(BaseException):
    """Raise it once the trial's state is saved: the trial goes on after the requeue.

    A BaseException, like KeyboardInterrupt, so that an objective's `except Exception` lets it through.
    """


class Running:
    """The trial this process runs, set by worker.py."""

    folder = None  # runs/<study>/trials/<number>/, while a plain objective runs
    stop = None  # worker.StopSignal
    artifacts = None  # the study's artifact store (artifacts.store): set by the worker, for a trainer or an objective
    agree = None  # several processes per trial: every rank gets rank 0's answer (ranks.py)


def trial_dir(trial: optuna.trial.BaseTrial) -> Path:
    """The trial's own folder (created): runs/<study>/trials/<number>/; outside the tool, a temporary one."""
    folder = Running.folder or private_temp_dir() / f"trial-{trial.number}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def artifact_store() -> optuna.artifacts.FileSystemArtifactStore:
    """The study's artifact store, for optuna.artifacts.upload_artifact(artifact_store=..., file_path=...,
    study_or_trial=trial): the dashboard and `make best` list what it holds. An upload is a copy, in
    runs/<study>/artifacts/; save big files as weights.pt or checkpoint.pt in trial_dir(trial) instead: the
    tool registers those in place. Outside the tool, a store in a temporary folder."""
    if Running.artifacts is not None:
        return Running.artifacts
    uploads = private_temp_dir() / "artifacts"
    uploads.mkdir(exist_ok=True)
    return optuna.artifacts.FileSystemArtifactStore(uploads)


@functools.cache
def private_temp_dir() -> Path:
    """This process's own temporary folder, outside the tool: made by mkdtemp (0700, a fresh random name),
    since a predictable name in /tmp could be made first, or planted as a symlink, by another user."""
    return Path(tempfile.mkdtemp(prefix="optuna-"))


def stop_requested() -> bool:
    """True once the walltime or a preemption is near: save your state and raise Stop."""
    asked = Running.stop is not None and Running.stop.received is not None
    if Running.stop is not None:
        Running.stop.interrupt_now = False  # the objective stops at its own safe points from now on
    return Running.agree(asked) if Running.agree else asked
