"""Several objectives: a Pareto front found, shown, exported and retrained; progress kept without Optuna's report."""

import json
import shutil
from pathlib import Path

import optuna
import yaml
from conftest import PROJECT, load_study, run_script, write_experiment

TWO = {
    "study.optimization_metric": ["val_mae_mean", "val_r2_mean"],
    "study.optimization_direction": ["minimize", "maximize"],
    "study.pruner": None,
    "study.n_trials": 4,
}


def test_a_trainer_with_two_metrics_makes_a_pareto_front(tmp_path):
    path = write_experiment(tmp_path / "exp", TWO)
    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 0, out.stdout + out.stderr
    study = load_study(path)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert all(t.state.name == "COMPLETE" and len(t.values) == 2 for t in study.trials)
    curve = (path.parent / "runs/tiny/trials/0/progress.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in curve] == [0, 1], "progress is kept without Optuna's report"
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert f"Pareto front: {len(study.best_trials)} trial(s)" in status
    # A trial an array task ran is listed with its task, both values shown.
    first = study.trials[0]
    values = [first.values[0] + 1, first.values[1] - 1]  # dominated: the front stays as it was
    attrs = {"slurm_task": "999999_0"}
    study.add_trial(
        optuna.trial.create_trial(
            params=first.params, distributions=first.distributions, values=values, user_attrs=attrs
        )
    )
    study.set_user_attr("array_jobs", [{"job_id": "999999", "tasks": 1}])
    out = run_script("submit_study.py", "--config", path, "--status")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    shown = ", ".join(f"{v:.6g}" for v in values)
    assert any(line.startswith("999999_0") and shown in line for line in out.stdout.splitlines()), out.stdout
    # The front's export is no experiment: retraining it names the way to retrain one member.
    whole = run_script("worker.py", "--config", path.parent / "best_trial.yaml")
    assert whole.returncode == 2 and "--trial N" in whole.stderr and "Traceback" not in whole.stderr, whole.stderr
    front = yaml.safe_load((path.parent / "best_trial.yaml").read_text())["pareto_front"]
    assert sorted(m["best_trial"]["number"] for m in front) == sorted(t.number for t in study.best_trials)
    assert all(m["model"]["d_in"] == 1 + m["model"]["d_pos"] for m in front), "each member's resolved config"
    member = study.best_trials[0].number
    out = run_script("submit_study.py", "--config", path, "--export_best", tmp_path, "--trial", member)
    assert out.returncode == 0, out.stderr
    retrained = run_script("worker.py", "--config", tmp_path / f"trial_{member}.yaml")
    assert retrained.returncode == 0, retrained.stdout + retrained.stderr
    again = load_study(path, f"tiny_best{member}").trials[0]  # runs_dir is absolute in the export
    assert again.values == study.trials[member].values, "same config, same (deterministic CPU) result"


def test_a_plain_objective_returning_two_values(tmp_path):
    changes = {**TWO, "study.optimization_metric": ["a", "b"], "study.optimization_direction": "minimize,minimize"}
    path = write_experiment(tmp_path / "exp", {**changes, "study.objective": "objectives:two", "data.dir": None})
    shutil.copy(PROJECT / "tests" / "objectives.py", path.parent / "objectives.py")
    out = run_script("submit_study.py", "--config", path, "--local", 1)
    assert out.returncode == 0, out.stdout + out.stderr
    study = load_study(path)
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert all(set(t.user_attrs["metrics"]) == {"a", "b"} for t in study.trials)
    front = [t for t in study.trials if 0 <= t.params["x"] <= 1]
    text = (path.parent / "best_trial.yaml").read_text()
    assert len(yaml.safe_load(text)["pareto_front"]) == len(study.best_trials) >= len(front)
    assert "&id" not in text and "*id" not in text, "each member reads on its own, without YAML anchors"
    flags = ("--optimization_metric", "a", "--optimization_direction", "minimize", "--no-submit_jobs")
    one = run_script("submit_study.py", "--config", path, *flags)
    assert one.returncode == 2 and "but study 'tiny' was created to minimize and minimize" in one.stderr


def test_a_pruner_or_a_count_mismatch_is_refused(tmp_path):
    for changes, words in [
        ({**TWO, "study.pruner": {"name": "MedianPruner"}}, "cannot prune a study with several objectives"),
        ({**TWO, "study.optimization_direction": ["minimize"]}, "1 direction(s) for 2 metric(s)"),
    ]:
        path = write_experiment(tmp_path / "exp", changes)
        out = run_script("submit_study.py", "--config", path, "--no-submit_jobs")
        assert out.returncode == 2 and words in out.stderr, out.stderr
        assert not Path(path.parent / "runs").exists()
