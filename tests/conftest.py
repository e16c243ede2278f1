"""Shared fixtures: a tiny real experiment (real data, real training, real Optuna storage)."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from sqlalchemy.engine import make_url

from parallel_optuna.storage import journal

PROJECT = Path(__file__).resolve().parent.parent

TINY = {
    "study": {
        "study_name": "tiny",
        "trainer": "examples.ishigami_lstm:train",
        "n_trials": 4,
        "sampler": {"name": "TPESampler", "seed": 0, "n_startup_trials": 2},
        "pruner": {"name": "NopPruner"},
    },
    "slurm": {
        "walltime": "00:10:00",
        "gpus_per_task": 0,
        # The local cluster enforces memory: a worker of this experiment peaks at 230 MB MaxRSS (torch, scipy
        # and the tiny model; docs/development.md says how it was measured), so 500M clears it twice over.
        "mem_per_cpu": "500M",
        "max_concurrent_jobs": 2,
        "signal_grace": 60,
    },
    "data": {"dir": "data", "n_samples": 192, "seed": 0},
    "model": {"d_pos": 2, "d_hidden": 8, "n_layers": 1, "d_in": None, "d_head": None},
    "training": {"epochs": 2, "batch_size": 64, "lr": 0.01, "k_folds": 2, "device": "auto", "seed": 0},
    "search_space": {
        "model.d_pos": {"type": "int", "low": 2, "high": 12, "step": 2},
        "training.lr": {"type": "float", "low": 1e-3, "high": 3e-2, "log": True},
    },
}


def write_experiment(folder, changes=None, name="config.yaml"):
    """A tiny experiment YAML in folder; changes are {"section.key": value} edits."""
    config = yaml.safe_load(yaml.safe_dump(TINY))
    for dotted, value in (changes or {}).items():
        # search_space keys are dotted paths themselves: split only the section off
        *parents, leaf = dotted.split(".", 1) if dotted.startswith("search_space.") else dotted.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def experiment(tmp_path):
    return write_experiment(tmp_path / "experiments" / "tiny")


def run_script(script, *args, env=None, timeout=300, cwd=None):
    """Run one of the project's scripts as a user would, with this interpreter."""
    return subprocess.run(
        [sys.executable, str(PROJECT / script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def run_script_without(module, script, *args):
    """Run one of the project's scripts as if the package `module` were not installed."""
    return run_script("tests/processes.py", "without", module, PROJECT / script, *args, timeout=120)


def load_study(config_path, study_name=None):
    """The study the YAML names: in its study.storage URL, else in the journal file of its run directory."""
    try:
        study = yaml.safe_load(Path(config_path).read_text())["study"]
    except (yaml.YAMLError, KeyError, TypeError):  # a test broke the YAML on purpose: it names the study
        study = {}
    name = study_name or study["study_name"]
    if study.get("storage"):
        return optuna.load_study(study_name=name, storage=study["storage"])
    storage = journal.open_journal(Path(config_path).parent / "runs" / name / "journal.log")  # as the tool does
    return optuna.load_study(study_name=name, storage=storage)


def plugin_experiment(tmp_path, changes=None):
    path = write_experiment(tmp_path / "exp", {"study.trainer": "plugin:train", **(changes or {})})
    shutil.copy(PROJECT / "tests" / "plugin.py", path.parent / "plugin.py")
    return path


def enqueue(path, *params):
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    study = load_study(path)
    for p in params:
        study.enqueue_trial(p)
    return study


def finished(study):
    return [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]


# ---------------------------------------------------------------- the local SLURM cluster
@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(items):
    """With pytest-xdist (make test: -n 2 --dist loadgroup) the cluster's tests run one after another in one
    process: some take the node down or count the queue, which a neighbour's jobs would disturb."""
    for item in items:
        if "slurm" in item.fixturenames or item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))


def _cluster_up():
    if not shutil.which("sinfo"):
        return "sinfo not found"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        return f"slurmctld not answering: {out.stderr.strip()}"
    return None


@pytest.fixture(scope="session")
def slurm():
    """The local cluster that `make test` starts (scripts/local_cluster.sh); CI must have it."""
    problem = _cluster_up()
    if problem and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(["bash", str(PROJECT / "scripts" / "local_cluster.sh"), "up"], capture_output=True, timeout=600)
        problem = _cluster_up()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no local SLURM cluster: {problem}")
        pytest.skip(f"no local SLURM cluster ({problem}); `make cluster` as root on Debian starts one")
    return subprocess.run(["hostname", "-s"], capture_output=True, text=True).stdout.strip()


def _cluster_has(what, pattern):
    """Fail under CI=true, else skip, unless `scontrol show config` matches (scripts/local_cluster.sh sets it)."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    if re.search(pattern, config):
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the local cluster has no {what}: run bash scripts/local_cluster.sh up")
    pytest.skip(f"the local cluster has no {what}; `bash scripts/local_cluster.sh up` sets it up where it can")


@pytest.fixture(scope="session")
def accounting(slurm):
    """sacct and sacctmgr answer: slurmdbd keeps the cluster's accounting."""
    _cluster_has("accounting", r"AccountingStorageType\s*=\s*accounting_storage/slurmdbd")
    return slurm


@pytest.fixture(scope="session")
def memory_enforced(accounting):
    """A task past its memory request is killed (OUT_OF_MEMORY), and accounting records its MaxRSS."""
    _cluster_has("memory enforcement (cgroup v1 is needed)", r"TaskPlugin\s*=.*task/cgroup")
    return accounting


# ---------------------------------------------------------------- the local PostgreSQL server
def _postgres_up():
    """(URL, None) from scripts/local_postgres.sh, or (None, why it cannot run here)."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, "not root on Debian"
    script = ["bash", str(PROJECT / "scripts" / "local_postgres.sh"), "up"]
    try:
        out = subprocess.run(script, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return None, "local_postgres.sh up took over 900 s"
    if out.returncode != 0 or not out.stdout.strip():
        return None, (out.stderr.strip().splitlines() or ["local_postgres.sh up failed"])[-1]
    if importlib.util.find_spec("psycopg2") is None:
        return None, "its driver is missing: pip install psycopg2-binary"
    return out.stdout.strip().splitlines()[-1], None


@pytest.fixture(scope="session")
def postgres():
    """The local server's URL (scripts/local_postgres.sh, started here as the SLURM cluster is); CI must have it."""
    url, problem = _postgres_up()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but no local PostgreSQL server: {problem}")
        pytest.skip(f"no local PostgreSQL server ({problem}); `sudo bash scripts/local_postgres.sh up` starts one")
    return url


def _admin(url, sql):
    import psycopg2

    u = make_url(url)
    connection = psycopg2.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database)
    connection.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
    try:
        connection.cursor().execute(sql)
    finally:
        connection.close()


@pytest.fixture
def postgres_db(postgres, request):
    """A fresh database for one test, so that runs never share a study; dropped afterwards."""
    name = f"t_{re.sub(r'[^a-z0-9]+', '_', request.node.name.lower())[:40]}_{os.getpid()}"
    _admin(postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    _admin(postgres, f'CREATE DATABASE "{name}"')
    yield make_url(postgres).set(database=name).render_as_string(hide_password=False)
    _admin(postgres, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
