"""Optuna artifacts of a study: the trials' weights and checkpoints and the report's plots, never stored twice.

Optuna and optuna-dashboard list a trial's files as artifacts (optuna.artifacts). The tool registers
    trials/<n>/weights.pt (else checkpoint.pt)   on trial n, before the worker tells it
    report/<plot>.png                            on the study, when `make report` draws it
in place: the artifact id is the file's path in the run directory, hex-encoded (optuna-dashboard takes
ids of hex digits and dashes only), and RunArtifactStore opens the file where it lies, so no byte is
copied. Of a trial's files only the one the checkpoint clean may keep is registered (register_trial_files).
A file the checkpoint clean deleted later stays registered (Optuna cannot unregister an
artifact): reading it raises ArtifactNotFound, saying that it was deleted and why. A result kept after
its trial was failed under a live worker (worker.keep_result) has none: Optuna adds it finished.

What a trainer or an objective uploads itself (optuna.artifacts.upload_artifact with
trial_control.artifact_store()) is copied, as Optuna does, into runs/<study>/artifacts/<uuid>.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import BinaryIO

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
from optuna.artifacts.exceptions import ArtifactNotFound

from parallel_optuna import checkpoints
from parallel_optuna.run_dir import make_private_dirs, run_dir
from parallel_optuna.storage import optuna_internals

TRIAL_FILES = (checkpoints.WEIGHTS, checkpoints.CHECKPOINT)
UPLOADS = "artifacts"  # runs/<study>/artifacts/: the files objectives upload, under Optuna's uuid ids
TORCH_FILE = "application/octet-stream"  # what mimetypes guesses for .pt is a SNES format
IN_PLACE = re.compile(r"(trials/\d+|report)/[\w-][\w.-]*")  # the run directory's files an id may name


def file_id(relative: str) -> str:
    """The artifact id of a file of the run directory: its path there, hex-encoded."""
    return relative.encode().hex()


def in_place(artifact_id: str) -> str | None:
    """The run directory's file an id names ('trials/3/weights.pt'), or None for an uploaded artifact's uuid."""
    try:
        relative = bytes.fromhex(artifact_id).decode()
    except ValueError:  # a uuid (dashes) or any other id; UnicodeDecodeError is a ValueError
        return None
    return relative if IN_PLACE.fullmatch(relative) else None


def why_gone(relative: str) -> str:
    if relative.startswith("report/"):
        return f"{relative} is gone from the run directory; make report draws it again"
    return (
        f"{relative} was deleted by the checkpoint clean: it keeps the weights of the study.keep_best best "
        "trials only (docs/operations.md); the trial's config, metrics and log are kept"
    )


class RunArtifactStore(FileSystemArtifactStore):
    """Optuna's FileSystemArtifactStore over runs/<study>/artifacts, which also opens the run directory's
    registered files in place (trials' weights and checkpoints, the report's plots)."""

    def __init__(self, folder: str | Path) -> None:
        self.run_folder = Path(folder)
        self.uploads = self.run_folder / UPLOADS
        super().__init__(self.uploads)

    def open_reader(self, artifact_id: str) -> BinaryIO:
        relative = in_place(artifact_id)
        if relative is None:
            return super().open_reader(artifact_id)
        try:
            return open(self.run_folder / relative, "rb")
        except FileNotFoundError:
            raise ArtifactNotFound(why_gone(relative)) from None

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        if in_place(artifact_id):
            raise ValueError(f"artifact {artifact_id} is the run directory's {in_place(artifact_id)}: not writable")
        # The run directory's rule (run_dir.run_subdir): the group reads only where --group_access opened it.
        make_private_dirs(self.uploads, 0o750 if os.stat(self.run_folder).st_mode & 0o040 else 0o700)
        super().write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        relative = in_place(artifact_id)
        if relative is None:
            return super().remove(artifact_id)
        try:
            os.remove(self.run_folder / relative)
        except FileNotFoundError:
            raise ArtifactNotFound(why_gone(relative)) from None

    def exists(self, artifact_id: str) -> bool:
        """Whether the artifact can still be read (a deleted checkpoint stays registered)."""
        relative = in_place(artifact_id)
        return (self.run_folder / relative if relative else self.uploads / artifact_id).is_file()


def store(config) -> RunArtifactStore:
    """The study's artifact store: runs/<study>/artifacts, and the run directory's files in place."""
    return RunArtifactStore(run_dir(config))


def register_trial_files(trial: optuna.Trial, folder: Path) -> list[str]:
    """Register the trial's file that may outlive the checkpoint clean: its weights.pt, else (a trainer
    that saves no weights) its checkpoint.pt, which the clean keeps for a best trial. A checkpoint beside
    weights is deleted by the first clean after the tell, so it is not listed. The id, or none.

    Called before the trial is told: Optuna attaches no artifact to a finished trial.
    """
    for name in TRIAL_FILES:  # weights first
        if (folder / name).is_file():
            artifact_id = file_id(f"trials/{folder.name}/{name}")
            optuna_internals.add_artifact(trial, artifact_id, name, TORCH_FILE)
            return [artifact_id]
    return []


def register_report_file(study: optuna.Study, png: Path) -> str:
    """Register a plot of runs/<study>/report/ as a study artifact; drawn again, it keeps its id."""
    artifact_id = file_id(f"report/{png.name}")
    optuna_internals.add_artifact(study, artifact_id, png.name)
    return artifact_id


def readable_artifacts(study: optuna.Study, config, trial: optuna.trial.FrozenTrial) -> dict[str, str]:
    """{artifact id: file name} of the trial's artifacts that can be read, and will still be after the
    checkpoint clean that follows the export, for best_trial.yaml."""
    kept = store(config)
    doomed = checkpoints.removable(study, config, study.get_trials(deepcopy=False), [trial]).get(trial.number, ())
    doomed_ids = {file_id(f"trials/{trial.number}/{name}") for name in doomed}
    metas = get_all_artifact_meta(trial, storage=optuna_internals.storage_of(study))
    return {m.artifact_id: m.filename for m in metas if kept.exists(m.artifact_id) and m.artifact_id not in doomed_ids}
