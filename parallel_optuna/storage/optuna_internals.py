"""Every use of Optuna's private API, in one place: Optuna is pinned (requirements.txt), and an
upgrade checks this file.

What the tool needs that Optuna's public API does not give: a live Trial for a trial found in
get_trials() (to fail another worker's dead trial, resume one after a requeue, or hand a plain
objective its trial), the study's storage object (heartbeats, system attributes, the dashboard),
the journal's snapshot and lock classes and op codes (journal.py), and the attribute that registers
an artifact (artifacts.py registers files in place, with ids of its own).
"""

import contextlib
import dataclasses
import importlib
import json
import mimetypes
import pickle

import optuna
from optuna.artifacts import ArtifactMeta
from optuna.artifacts._upload import ARTIFACTS_ATTR_PREFIX, DEFAULT_MIME_TYPE
from optuna.storages.journal._base import BaseJournalSnapshot
from optuna.storages.journal._file import LOCK_FILE_SUFFIX, BaseJournalFileLock, get_lock_file
from optuna.storages.journal._storage import JournalOperation

__all__ = ["BaseJournalSnapshot", "BaseJournalFileLock", "JournalOperation", "LOCK_FILE_SUFFIX", "get_lock_file"]

# The system attribute of a trial created with its params given (study.enqueue_trial, a retry): Optuna's
# Trial.suggest_* returns these and samples nothing.
FIXED_PARAMS = "fixed_params"


def storage_of(study):
    """The study's own storage object (RDB: wrapped in a cache that holds the heartbeat settings)."""
    return study._storage


def live_trial(study, trial, kind=optuna.trial.Trial):
    """A live `kind` (an optuna.Trial) for a trial of the study, found by get_trials() or ask()."""
    return kind(study, trial._trial_id)


def system_attrs(study, trial):
    """The trial's system attributes as stored now (Optuna's retry callback links a retry there)."""
    return study._storage.get_trial_system_attrs(trial._trial_id)


def frozen(study, trial):
    """The stored FrozenTrial of a live Trial (Optuna 5's Trial has no system_attrs of its own)."""
    return study._storage.get_trial(trial._trial_id)


def storage_lock(study):
    """The lock a storage holds around each of its operations in this process (JournalStorage's thread lock);
    a no-op where the storage has none (an RDB storage's transaction is whole or absent)."""
    return getattr(study._storage, "_thread_lock", None) or contextlib.nullcontext()


def heartbeat_interval(study):
    """The storage's heartbeat interval in seconds; None when it has no heartbeat (journal, in-memory)."""
    return getattr(study._storage, "get_heartbeat_interval", lambda: None)()


def record_heartbeat(study, trial):
    study._storage.record_heartbeat(trial._trial_id)


def stale_trial_numbers(study):
    """The RUNNING trials whose heartbeat stopped (RDB storages with a heartbeat)."""
    storage = study._storage
    return {storage.get_trial_number_from_id(i) for i in storage._get_stale_trial_ids(study._study_id)}


def save_journal_snapshot(storage):
    """Save a JournalStorage's replayed state as its backend's snapshot now (as Optuna does every 100 trials)."""
    with storage._thread_lock:
        storage._sync_with_backend()
        storage._backend.save_snapshot(pickle.dumps(storage._replay_result))


def journal_backend(storage):
    """The backend (journal.JournalFile) of a JournalStorage."""
    return storage._backend


def add_artifact(study_or_trial, artifact_id, filename, mimetype=None):
    """Register a file as an artifact of a live Trial or a Study under an id of our choosing, as
    optuna.artifacts.upload_artifact records one (same attribute, same ArtifactMeta), with no upload:
    artifacts.RunArtifactStore opens the file where it lies."""
    guessed, encoding = mimetypes.guess_type(filename)
    meta = ArtifactMeta(artifact_id, filename, mimetype or guessed or DEFAULT_MIME_TYPE, encoding)
    key, value = ARTIFACTS_ATTR_PREFIX + artifact_id, json.dumps(dataclasses.asdict(meta))
    if isinstance(study_or_trial, optuna.Study):
        study_or_trial._storage.set_study_system_attr(study_or_trial._study_id, key, value)
    else:
        study_or_trial.storage.set_trial_system_attr(study_or_trial._trial_id, key, value)


def still_random(sampler, trials):
    """Whether a GPSampler or TPESampler samples its next trial at random (its startup trials): it then
    needs to see no other trial, whichever are running. None for another sampler: it cannot tell."""
    if isinstance(sampler, optuna.samplers.GPSampler):
        finished = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    elif isinstance(sampler, optuna.samplers.TPESampler):
        finished = sum(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    else:
        return None
    return finished < sampler._n_startup_trials


def import_gp_modules():
    """Import what GPSampler imports at its first model fit: torch and scipy, two seconds of CPU or more."""
    for name in GP_MODULES:
        importlib.import_module(name)


# What a GPSampler's first fit imports, lazily (Optuna's _LazyImport): found with python -X importtime.
GP_MODULES = ("torch", "scipy.optimize", "scipy.stats", "optuna._gp.gp", "optuna._gp.acqf", "optuna._gp.optim_mixed")
