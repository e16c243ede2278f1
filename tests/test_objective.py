"""Plain Optuna objectives, unchanged, run by the tool: locally, on the array, through a walltime."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import PROJECT, finished, load_study, run_script, write_experiment
from slurm_helpers import submitted_jobs, wait_for_jobs

from parallel_optuna.config_versions import compact


def objective_experiment(tmp_path, objective, changes=None):
    changes = {"study.objective": f"objectives:{objective}", "data.dir": None, **(changes or {})}
    path = write_experiment(tmp_path / "exp", changes)
    shutil.copy(PROJECT / "tests" / "objectives.py", path.parent / "objectives.py")
    return path


def test_a_plain_objective_runs_locally_and_its_best_trial_retrains(tmp_path):
    path = objective_experiment(tmp_path, "quick", {"study.n_trials": 6, "study.pruner": {"name": "MedianPruner"}})
    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "note: study.objective objectives:quick runs; the YAML's trainer and search_space are not used" in out.stdout
    assert "no study.trainer" not in out.stderr, "a plain objective needs no trainer"
    unset = "no study.optimization_metric nor study.optimization_direction: the study will minimize value"
    assert unset in out.stderr, "the defaults are the example's: said, as they may not be the objective's"
    study = load_study(path)
    assert len(finished(study)) == 6
    assert set(study.best_trial.params) == {"x", "kind"} and study.best_trial.user_attrs["note"].startswith("kind")
    assert all(t.user_attrs["host"] and t.user_attrs["config_version"] for t in finished(study))
    journal = path.parent / "runs/tiny/journal.log"
    cli = [Path(sys.executable).parent / "optuna", "best-trial", "--storage", journal, "--study-name", "tiny"]
    stock = subprocess.run([*cli, "-f", "json"], capture_output=True, text=True, timeout=120)  # the stock CLI reads it
    assert stock.returncode == 0 and json.loads(stock.stdout)["number"] == study.best_trial.number, stock.stderr
    best = path.parent / "best_trial.yaml"
    exported = yaml.safe_load(best.read_text())
    assert exported["study"]["objective"] == "objectives:quick" and exported["best_trial"]["params"]
    assert "trainer" not in exported["study"] and "search_space" not in exported, "the objective chooses its params"
    retrained = run_script("worker.py", "--config", best)
    assert retrained.returncode == 0, retrained.stdout + retrained.stderr
    assert f"the exported trial {study.best_trial.number} of study tiny measured value = " in retrained.stdout
    again = load_study(best, f"tiny_best{study.best_trial.number}")
    assert again.trials[0].params == study.best_trial.params and again.trials[0].value == study.best_value
    twice = run_script("worker.py", "--config", best)
    assert twice.returncode == 0 and "this export was retrained already" in twice.stdout, twice.stderr
    assert "--study_name <new name>" in twice.stdout and len(load_study(best, again.study_name).trials) == 1


PLAIN = "def objective(trial):\n    return trial.suggest_float('x', -1, 1) ** 2\n"


def test_a_users_module_named_like_a_module_of_the_tool_runs(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 1, "data.dir": None})
    for name in ("journal", "liveness", "config", "status"):  # the tool's own live in its package, not beside yours
        (path.parent / f"{name}.py").write_text(PLAIN)
        out = run_script("worker.py", "--config", path, "--objective", f"{name}:objective", "--trials", 1)
        assert out.returncode == 0, out.stdout + out.stderr
    assert [t.state.name for t in load_study(path).trials] == ["COMPLETE"], "one budget: one trial, then covered"


def test_an_objective_saved_beside_the_scripts_runs_from_any_folder(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 1, "data.dir": None})
    name = f"my_objective_{tmp_path.name.replace('-', '_')}"
    module = PROJECT / f"{name}.py"
    module.write_text(PLAIN)
    try:
        out = run_script(
            "submit_study.py", "--config", path, "--objective", f"{name}:objective", "--local", 1, cwd=tmp_path
        )
        assert out.returncode == 0, out.stdout + out.stderr
    finally:
        module.unlink()
    assert [t.state.name for t in load_study(path).trials] == ["COMPLETE"]


def test_a_yaml_that_names_no_code_is_refused_with_the_fix(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.trainer": None})
    out = run_script("submit_study.py", "--config", path, "--no-submit_jobs")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.strip().splitlines() == [
        f"error: {path}: study.trainer: names no code to run (nor does study.objective); fix: name your trainer as "
        "study.trainer: module:function, or a plain Optuna objective as study.objective (config.example.yaml names "
        "the example's, examples.ishigami_lstm:train)"
    ]
    assert not (path.parent / "runs").exists()


def test_the_objective_flag_wins_over_the_yaml_and_bad_modules_fail_at_submit(tmp_path):
    path = objective_experiment(tmp_path, "quick")
    (path.parent / "trial_control.py").write_text("def objective(trial):\n    return 0.0\n")
    script = (
        "import optuna\ndef objective(trial):\n    return 0.0\noptuna.create_study().optimize(objective, n_trials=2)\n"
    )
    (path.parent / "script.py").write_text(script)  # its own study, not under if __name__ == "__main__"
    for flag, words in [
        ("script:objective", "importing 'script' runs study.optimize()"),
        ("nowhere:objective", "cannot import 'nowhere:objective'"),
        ("objectives:missing", "'objectives:missing' has no such function"),
        ("trial_control:objective", "has the name of one of Parallel Optuna's own top-level names"),
    ]:
        out = run_script("submit_study.py", "--config", path, "--objective", flag, "--no-submit_jobs")
        assert out.returncode == 2 and words in out.stderr and "study.objective" in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1
    assert not (path.parent / "runs").exists(), "nothing created on bad input"
    out = run_script("worker.py", "--config", path, "--objective", "objectives:steals_host", "--n_trials", 1)
    trial = load_study(path).trials[0]
    assert trial.state.name == "FAIL" and "'host' is the tool's own" in trial.user_attrs["fail_reason"]
    assert trial.user_attrs["host"] != "elsewhere"


def test_status_reports_the_configs_a_plain_objective_trained_again(tmp_path):
    path = objective_experiment(tmp_path, "coin", {"study.n_trials": 4})
    out = run_script("worker.py", "--config", path, "--trials", 4)
    assert out.returncode == 0, out.stdout + out.stderr
    trials = load_study(path).trials
    again = [t.number for t in trials if any(u.params == t.params for u in trials[: t.number])]
    assert len(again) >= 2, "four trials of two configs repeat at least two"
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    line = next(line for line in status.splitlines() if line.startswith("repeats trained again"))
    assert "a plain objective picks its params as it runs" in line
    assert line.endswith(f"trials {compact(again)}"), line


@pytest.mark.slurm
def test_examples_run_on_the_cluster(slurm, tmp_path):
    for example in ("plain_objective", "trainer_api"):
        folder = tmp_path / example
        shutil.copytree(PROJECT / "examples" / example, folder)
        out = run_script("submit_study.py", "--config", folder / "config.yaml", "--n_trials", 2, "--walltime", 10)
        assert out.returncode == 0, out.stdout + out.stderr
        wait_for_jobs(submitted_jobs(out.stdout))
        study = load_study(folder / "config.yaml")
        assert len(finished(study)) == 2, [(t.state.name, t.user_attrs.get("fail_reason")) for t in study.trials]
        assert all(t.user_attrs["slurm_task"] for t in study.trials)


@pytest.mark.slurm
def test_a_plain_objective_through_the_walltime(slurm, tmp_path):
    # Both trials outlive a 1-minute walltime (SLURM's USR2 comes 5-35 s in). Trial 0 saves its state when
    # trial_control says so and continues; trial 1 never asks, so it is stopped and runs again from the start.
    path = objective_experiment(
        tmp_path, "mixed", {"study.n_trials": 2, "slurm.walltime": "1", "slurm.signal_grace": 25}
    )
    out = run_script("submit_study.py", "--config", path)
    assert out.returncode == 0, out.stderr
    wait_for_jobs(submitted_jobs(out.stdout), timeout=400)
    steady, oblivious = load_study(path).trials
    assert steady.state.name == "COMPLETE" and steady.user_attrs["requeues"] >= 1
    assert sorted(steady.intermediate_values) == list(range(30)), "it continued from its own state"
    assert oblivious.state.name == "COMPLETE" and oblivious.user_attrs["runs"] == 2
    # Once stopped mid-run; a requeued task whose USR2 comes before the rerun starts requeues once more.
    assert oblivious.user_attrs["requeues"] == oblivious.user_attrs["slurm_restart_count"] >= 1
    log = Path(oblivious.user_attrs["log_path"]).read_text()
    assert "the objective stops at its next report, should_prune or suggest call" in log


def test_a_plain_objective_with_two_values_needs_no_metric_names(tmp_path):
    """As in Optuna: the directions alone; the values are shown as Optuna names them, values_0 and values_1."""
    path = objective_experiment(tmp_path, "two", {"study.optimization_direction": ["minimize", "minimize"]})
    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "no study.optimization_metric: the study will minimize values_0, minimize values_1" in out.stderr
    assert len(finished(load_study(path))) == 4
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert "Pareto front:" in status and "values_0 = " in status and "values_1 = " in status, status
    front = yaml.safe_load((path.parent / "best_trial.yaml").read_text())["pareto_front"]
    assert front and all(member["best_trial"]["metric"] == ["values_0", "values_1"] for member in front)
