"""Optuna's conventions on our studies: the trials' files as artifacts (in the dashboard, in best_trial.yaml),
an objective's own uploads and metric names."""

import getpass
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import PROJECT, load_study, run_script, write_experiment

from parallel_optuna import artifacts, trial_control
from parallel_optuna.config import load_config


def artifact_names(study, trial):
    return sorted(m.filename for m in optuna.artifacts.get_all_artifact_meta(trial, storage=study._storage))


def fetch(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def dashboard(path):
    """`make dashboard` on a free port; (process, base URL)."""
    server = subprocess.Popen(
        [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path), "--dashboard", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = server.stdout.readline()
    return server, re.search(r"(http://127\.0\.0\.1:\d+)/dashboard", first)[1]


def test_the_trials_weights_are_artifacts_stored_once_and_the_dashboard_serves_them(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 4, "study.keep_best": 1})
    assert run_script("submit_study.py", "--config", path, "--local", 2).returncode == 0
    assert run_script("submit_study.py", "--config", path, "--report").returncode == 0
    study, run = load_study(path), path.parent / "runs/tiny"
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(artifact_names(study, t) == ["weights.pt"] for t in complete), "the clean deletes their checkpoints"
    assert not (run / "artifacts").exists(), "registered in place: no byte stored twice"
    study_files = artifact_names(study, study)
    assert "optimization_history.png" in study_files and "timeline.png" in study_files

    best = study.best_trial
    exported = yaml.safe_load((path.parent / "best_trial.yaml").read_text())["best_trial"]
    (weights_id,) = [i for i, name in exported["artifacts"].items() if name == "weights.pt"]
    assert exported["artifacts"] == {weights_id: "weights.pt"}
    deleted = next(t for t in complete if t.number != best.number)
    assert not (run / f"trials/{deleted.number}/weights.pt").exists(), "keep_best: 1 cleaned the others"
    deleted_id = artifacts.file_id(f"trials/{deleted.number}/weights.pt")

    store = artifacts.store(load_config(path))  # the Python API: download_artifact with the study's store
    optuna.artifacts.download_artifact(artifact_store=store, artifact_id=weights_id, file_path=str(tmp_path / "w.pt"))
    assert (tmp_path / "w.pt").read_bytes() == (run / f"trials/{best.number}/weights.pt").read_bytes()
    with pytest.raises(optuna.artifacts.exceptions.ArtifactNotFound, match="deleted by the checkpoint clean"):
        optuna.artifacts.download_artifact(artifact_store=store, artifact_id=deleted_id, file_path=str(tmp_path / "x"))

    server, url = dashboard(path)
    try:
        study_id = json.loads(fetch(f"{url}/api/studies"))["study_summaries"][0]["study_id"]
        trials = json.loads(fetch(f"{url}/api/studies/{study_id}?after=0"))["trials"]
        shown = next(t for t in trials if t["number"] == best.number)
        assert weights_id in [a["artifact_id"] for a in shown["artifacts"]]
        body = fetch(f"{url}/artifacts/{study_id}/{shown['trial_id']}/{weights_id}")
        assert body == (run / f"trials/{best.number}/weights.pt").read_bytes()
        gone = next(t for t in trials if t["number"] == deleted.number)
        with pytest.raises(urllib.error.HTTPError) as error:
            fetch(f"{url}/artifacts/{study_id}/{gone['trial_id']}/{deleted_id}")
        assert error.value.code == 410 and b"deleted by the checkpoint clean" in error.value.read()
        plot_id = artifacts.file_id("report/timeline.png")
        assert fetch(f"{url}/artifacts/{study_id}/{plot_id}") == (run / "report/timeline.png").read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=60)


UPLOADS = """import optuna

import trial_control


def objective(trial):
    x = trial.suggest_float("x", -1, 1)
    note = trial_control.trial_dir(trial) / "note.txt"
    note.write_text(f"x is {x}")
    optuna.artifacts.upload_artifact(
        artifact_store=trial_control.artifact_store(), file_path=str(note), study_or_trial=trial
    )
    trial.study.set_metric_names(["loss"])
    return x * x
"""


def run_uploads(tmp_path, changes, code):
    """A study run here with one worker, its code in uploads.py beside the YAML: (path, study, its store)."""
    path = write_experiment(tmp_path / "exp", changes)
    (path.parent / "uploads.py").write_text(code)
    out = run_script("submit_study.py", "--config", path, "--local", 1)
    assert out.returncode == 0, out.stdout + out.stderr
    return path, load_study(path), artifacts.store(load_config(path))


def test_a_plain_objective_uploads_artifacts_and_names_its_metric(tmp_path):
    changes = {"study.objective": "uploads:objective", "study.n_trials": 2, "data.dir": None}
    path, study, store = run_uploads(tmp_path, changes, UPLOADS)
    for t in study.trials:
        (meta,) = optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)
        assert meta.filename == "note.txt"
        with store.open_reader(meta.artifact_id) as f:
            assert f.read().decode() == f"x is {t.params['x']}"
        assert t.user_attrs["metrics"] == {"loss": t.value}
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert f"best: trial {study.best_trial.number}  loss = " in status
    exported = yaml.safe_load((path.parent / "best_trial.yaml").read_text())
    assert exported["best_trial"]["metric"] == "loss" and exported["study"]["optimization_metric"] == "loss"
    assert list(exported["best_trial"]["artifacts"].values()) == ["note.txt"]


TRAINER_UPLOADS = """import optuna

import trial_control


def train(config, trial):
    trial.save_checkpoint({"epoch": 1})  # no weights: the best trial's checkpoint is what stays
    note = trial.folder / "note.txt"
    note.write_text(f"lr is {config['training']['lr']}")
    optuna.artifacts.upload_artifact(
        artifact_store=trial_control.artifact_store(), file_path=str(note), study_or_trial=trial.trial
    )
    return {"val_mae_mean": config["training"]["lr"]}
"""


def test_a_trainer_uploads_to_the_study_and_a_checkpoint_without_weights_is_an_artifact(tmp_path):
    changes = {"study.trainer": "uploads:train", "study.n_trials": 3, "study.keep_best": 1, "data.dir": None}
    path, study, store = run_uploads(tmp_path, changes, TRAINER_UPLOADS)
    for t in study.trials:
        metas = {m.filename: m.artifact_id for m in optuna.artifacts.get_all_artifact_meta(t, storage=study._storage)}
        assert sorted(metas) == ["checkpoint.pt", "note.txt"]
        with store.open_reader(metas["note.txt"]) as f:  # in runs/tiny/artifacts/, not on the node's /tmp
            assert f.read().decode() == f"lr is {t.params['training.lr']}"
        assert store.exists(metas["checkpoint.pt"]) == (t.number == study.best_trial.number)
    exported = yaml.safe_load((path.parent / "best_trial.yaml").read_text())["best_trial"]
    assert sorted(exported["artifacts"].values()) == ["checkpoint.pt", "note.txt"]


def test_outside_the_tool_uploads_go_to_a_private_temporary_folder(tmp_path):
    planted = tmp_path / "planted"  # another user's folder at the name a process could predict
    planted.mkdir()
    predictable = Path(tempfile.gettempdir()) / f"optuna-artifacts-{os.getpid()}"
    predictable.unlink(missing_ok=True)
    predictable.symlink_to(planted)
    try:
        test_outside_the_tool_an_objective_uploads_to_a_temporary_store()
    finally:
        predictable.unlink()
    assert not any(planted.iterdir())
    folder = trial_control.private_temp_dir()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and folder.owner() == getpass.getuser()


def test_outside_the_tool_an_objective_uploads_to_a_temporary_store():
    study = optuna.create_study()
    study.optimize(lambda trial: upload_here(trial), n_trials=1)
    (meta,) = optuna.artifacts.get_all_artifact_meta(study.trials[0], storage=study._storage)
    with trial_control.artifact_store().open_reader(meta.artifact_id) as f:
        assert f.read() == b"42"
    shutil.rmtree(trial_control.trial_dir(study.trials[0]))


def upload_here(trial):
    note = trial_control.trial_dir(trial) / "note.txt"
    note.write_text("42")
    optuna.artifacts.upload_artifact(
        artifact_store=trial_control.artifact_store(), file_path=str(note), study_or_trial=trial
    )
    return 0.0


def test_an_id_names_a_file_of_the_run_directory_or_an_upload(tmp_path):
    store = artifacts.RunArtifactStore(tmp_path)
    (tmp_path / "trials/3").mkdir(parents=True)
    (tmp_path / "trials/3/weights.pt").write_bytes(b"w")
    weights = artifacts.file_id("trials/3/weights.pt")
    assert bytes.fromhex(weights).decode() == "trials/3/weights.pt"
    with store.open_reader(weights) as f:
        assert f.read() == b"w"
    for outside in ("trials/3/../../secret", "journal.log", "trials/3/.hidden"):
        assert artifacts.in_place(artifacts.file_id(outside)) is None, outside
    with pytest.raises(optuna.artifacts.exceptions.ArtifactNotFound):
        store.open_reader(artifacts.file_id("journal.log"))  # looked up among the uploads: not there
    upload = optuna.artifacts.upload_artifact  # an upload's uuid lands in runs/<study>/artifacts/
    study = optuna.create_study()
    (tmp_path / "note.txt").write_text("n")
    note = upload(artifact_store=store, file_path=str(tmp_path / "note.txt"), study_or_trial=study)
    assert (tmp_path / "artifacts" / note).read_text() == "n" and store.exists(note)
    with open(tmp_path / "note.txt", "rb") as body, pytest.raises(ValueError, match="not writable"):
        store.write(weights, body)
