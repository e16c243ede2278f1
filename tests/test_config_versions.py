"""Editing the experiment while it runs: a bad save never stops the study, safe edits take effect.

Real worker processes, a real journal study; the YAML is edited on disk between trials as a user would.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, load_study, plugin_experiment, run_script, write_experiment
from slurm_helpers import submitted_jobs, wait_for_jobs, wait_until

from parallel_optuna import config_versions

BROKEN = "study:\n  study_name: tiny\n  n_trials: [4\n"  # a syntax error, as saved mid-edit


def worker(path, *flags):
    out = run_script("worker.py", "--config", path, "--study_name", "tiny", *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def submit_dry(path, *flags):
    return run_script("submit_study.py", "--config", path, "--no-submit_jobs", *flags)


def edit(path, dotted, value):
    """Change one key of the YAML on disk, as a user's editor would (and make it look settled)."""
    config = yaml.safe_load(path.read_text())
    *parents, leaf = dotted.split(".", 1) if dotted.startswith("search_space.") else dotted.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[leaf] = value
    settled(path, yaml.safe_dump(config, sort_keys=False))


def settled(path, text):
    path.write_text(text)
    old = time.time() - 2 * config_versions.SETTLE_S
    os.utime(path, (old, old))


def resolved(trial):
    return yaml.safe_load(Path(trial.user_attrs["config_path"]).read_text())


def test_a_broken_yaml_mid_study_runs_on_the_last_valid_version(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 3})
    assert submit_dry(path).returncode == 0
    worker(path)
    settled(path, BROKEN)
    out = worker(path)
    assert "invalid YAML" in out.stdout and "using the version of" in out.stdout
    study = load_study(path, "tiny")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert study.trials[0].user_attrs["config_version"] == study.trials[1].user_attrs["config_version"]
    status = run_script("submit_study.py", "--config", path, "--status")
    assert status.returncode == 0, status.stderr
    assert f"{path} on disk cannot be used since" in status.stdout and "workers use the version of" in status.stdout
    export = run_script("submit_study.py", "--config", path, "--export_best", tmp_path / "best.yaml")
    assert export.returncode == 0 and (tmp_path / "best.yaml").exists()
    # Once the file is valid again, the warning is gone.
    edit_text = write_experiment(tmp_path / "exp", {"study.n_trials": 3}).read_text()
    settled(path, edit_text)
    worker(path)
    assert "cannot be used" not in run_script("submit_study.py", "--config", path, "--status").stdout


def test_a_worker_that_read_the_file_before_a_bad_save_does_not_hide_it(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 3})
    assert submit_dry(path).returncode == 0
    text, read_as = path.read_text(), config_versions.signature(path)  # a slow worker reads the good file
    good = config_versions.load(path, {"study_name": "tiny"})
    settled(path, BROKEN)
    config_versions.load(path, {"study_name": "tiny"}, worker=True)  # a faster one records the bad save
    config_versions.adopt(config_versions.versions_folder(good), good, text, read_as)  # the slow one goes on
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert "cannot be used since" in status, "a stale adopt cleared the warning"


def test_a_yaml_cut_short_is_not_adopted(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 3})
    assert submit_dry(path).returncode == 0
    full = path.read_text()
    settled(path, full[: full.index("search_space:")])  # still valid YAML: the search space and more are gone
    out = worker(path)
    assert "study.trainer: names no code to run" in out.stdout and "using the version of" in out.stdout, out.stdout
    trial = load_study(path, "tiny").trials[0]
    assert set(trial.params) == {"model.d_pos", "training.lr"}, "the version in force still had the search space"
    # A save that lost search_space but kept the study's name: a submit refuses it too, as the study samples
    # params this file no longer has (adopted, every later trial would train one config).
    settled(path, full[: full.index("search_space:")] + full[full.index("slurm:") :])
    out = worker(path)
    assert (
        "lacks search_space" in out.stdout and "restore search_space: submit refuses the file without it" in out.stdout
    )
    refused = submit_dry(path)
    assert refused.returncode == 2 and "search_space: is missing" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


def test_a_file_being_written_is_read_once_it_settles(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    writer = threading.Timer(0.4, lambda: path.write_text("a: 1\nb: 2\n"))
    writer.start()
    assert config_versions.read_settled(path, settle=1.0) == "a: 1\nb: 2\n"
    writer.join()


def test_a_file_that_says_the_version_in_force_is_used_without_waiting_and_the_edit_after_it_by_the_next_read(
    tmp_path,
):
    """Every task of an array started after a submit reads the YAML the submit adopted: nothing new to wait for."""
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    writer = threading.Timer(5.0, lambda: path.write_text("a: 1\nb: 2\n"))
    writer.start()
    assert config_versions.read_settled(path, settle=10.0, in_force=config_versions.version_of("a: 1\n")) == "a: 1\n"
    writer.join()
    assert config_versions.read_settled(path, settle=1.0, in_force=config_versions.version_of("a: 1\n")) == (
        "a: 1\nb: 2\n"
    )


def test_unsafe_edits_are_refused_by_workers_and_by_submit(tmp_path):
    path = write_experiment(
        tmp_path / "exp",
        {"study.n_trials": 4, "search_space.model.d_hidden": {"type": "categorical", "choices": [8, 16]}},
    )
    assert submit_dry(path).returncode == 0
    worker(path)
    for dotted, value, words in [
        ("study.optimization_metric", "val_rmse_mean", "study.optimization_metric changed"),
        ("search_space.model.d_hidden", {"type": "categorical", "choices": [8, 32]}, "changes how it is sampled"),
        ("search_space.training.lr", {"type": "float", "low": 1e-3, "high": 3e-2}, "changes how it is sampled"),
    ]:
        good = path.read_text()
        edit(path, dotted, value)
        out = worker(path)
        assert words in out.stdout and "using the version of" in out.stdout
        refused = submit_dry(path)
        assert refused.returncode == 2 and "choose a new study_name" in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        settled(path, good)
    study = load_study(path, "tiny")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4, [t.user_attrs for t in study.trials]
    assert len({t.user_attrs["config_version"] for t in study.trials}) == 1
    # The direction is fixed at creation; a new study name is simply a new study.
    edit(path, "study.optimization_direction", "maximize")
    assert submit_dry(path).returncode == 2
    assert submit_dry(path, "--study_name", "tiny_max").returncode == 0


def test_a_safe_edit_reaches_new_trials_and_a_retry_keeps_its_version(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 2, "training.sleep": 0.5, "training.epochs": 30})
    assert submit_dry(path).returncode == 0
    victim = subprocess.Popen(
        [sys.executable, str(PROJECT / "worker.py"), "--config", str(path), "--study_name", "tiny"],
        stdout=subprocess.DEVNULL,
    )
    checkpoint = path.parent / "runs/tiny/trials/0/checkpoint.pt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline:
        time.sleep(0.2)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    edit(path, "training.sleep", 0.01)  # a safe edit of the trainer's own config
    worker(path, "--trials", "0")
    trials = load_study(path, "tiny").trials
    old_version = trials[0].user_attrs["config_version"]
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == 0)
    assert retry.state.name == "COMPLETE" and retry.user_attrs["config_version"] == old_version
    assert resolved(retry)["training"]["sleep"] == 0.5, "the retry continues with the config it started with"
    new = [t for t in trials if t.state.name == "COMPLETE" and "retry_of" not in t.user_attrs]
    assert new and all(t.user_attrs["config_version"] != old_version for t in new)
    assert all(resolved(t)["training"]["sleep"] == 0.01 for t in new)
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert f"config {old_version}: trials" in status and "(in force)" in status


@pytest.mark.slurm
def test_editing_the_yaml_while_an_array_runs(slurm, tmp_path):
    path = plugin_experiment(
        tmp_path, {"study.n_trials": 4, "slurm.max_concurrent_jobs": 2, "training.sleep": 1.0, "training.epochs": 6}
    )
    good = path.read_text()
    out = run_script("submit_study.py", "--config", path)
    assert out.returncode == 0, out.stderr
    jobs = submitted_jobs(out.stdout)
    study = load_study(path, "tiny")
    wait_until(lambda: [t for t in study.get_trials() if t.state.name == "RUNNING"], what="a first trial")
    settled(path, BROKEN)

    def status_warns():  # once a worker has read the bad save, which may be a trial later
        status = run_script("submit_study.py", "--config", path, "--status").stdout
        return "cannot be used since" in status and "workers use the version of" in status

    wait_until(status_warns, what="status to warn of the bad save")

    def running_with_checkpoint():
        for t in study.get_trials():
            folder = path.parent / "runs/tiny/trials" / str(t.number)
            if t.state.name == "RUNNING" and (folder / "checkpoint.pt").exists() and "pid" in t.user_attrs:
                return t

    victim = wait_until(running_with_checkpoint, what="a trial on the last valid version, with a checkpoint")
    settled(path, good.replace("batch_size: 64", "batch_size: 32"))  # a safe edit of the trainer's config
    fixed_at = time.time()
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)  # its retry must keep the version it started with
    wait_for_jobs(jobs)
    wait_for_jobs(submitted_jobs(run_script("submit_study.py", "--config", path, "--n_trials", 5).stdout))
    trials = load_study(path, "tiny").trials
    assert len([t for t in trials if t.state.name == "COMPLETE"]) == 5, [(t.number, t.state) for t in trials]
    first_version = trials[0].user_attrs["config_version"]
    assert victim.user_attrs["config_version"] == first_version
    retry = next(t for t in trials if t.user_attrs.get("retry_of") == victim.number)
    assert retry.user_attrs["config_version"] == first_version and resolved(retry)["training"]["batch_size"] == 64
    new = [t for t in trials if t.datetime_start.timestamp() > fixed_at + 1 and "retry_of" not in t.user_attrs]
    assert new and all(resolved(t)["training"]["batch_size"] == 32 for t in new), "new trials use the edit"
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert "cannot be used" not in status and f"config {first_version}: trials" in status
