"""A real study on this machine: real storage files, real training, real worker processes."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from conftest import PROJECT, enqueue, finished, load_study, plugin_experiment, run_script, write_experiment

from parallel_optuna.storage import journal


def test_local_study_finishes_exactly_the_budget_and_exports_a_retrainable_best(experiment):
    out = run_script("submit_study.py", "--config", experiment, "--local", 2, "--n_trials", 5)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    study = load_study(experiment)
    assert len(finished(study)) == 5
    assert [t for t in study.get_trials() if t.state.name in ("RUNNING", "WAITING")] == []
    pids = {t.user_attrs["pid"] for t in study.get_trials()}
    assert len(pids) == 2, "both local workers ran trials"
    sections = set(yaml.safe_load(experiment.read_text())) | {"study", "slurm"}
    for t in finished(study):
        folder = experiment.parent / "runs" / "tiny" / "trials" / str(t.number)
        resolved = yaml.safe_load((folder / "config.yaml").read_text())
        assert set(resolved) == sections, "the trainer gets the user's settings, none of the tool's bookkeeping"
        assert resolved["model"]["d_in"] == 1 + t.params["model.d_pos"]
        assert (folder / "worker.log").read_text().count(f"trial {t.number} step") >= 1
        if t.state.name == "COMPLETE":
            assert json.loads((folder / "metrics.json").read_text())["val_mae_mean"] == t.value
        assert {"host", "pid", "started_at", "train_seconds", "log_path", "config_path"} <= set(t.user_attrs)

    best_file = experiment.parent / "best_trial.yaml"
    assert "best trial" in out.stdout and best_file.exists()
    exported = yaml.safe_load(best_file.read_text())
    assert set(exported) == sections | {"best_trial"}
    assert exported["best_trial"]["value"] == study.best_value
    assert exported["best_trial"]["params"] == study.best_params
    assert set(exported["best_trial"]["metrics"]) >= {"val_mae_mean", "val_rmse_mean", "val_r2_mean"}
    assert exported["model"]["d_in"] == 1 + study.best_params["model.d_pos"]

    # Retrain from best_trial.yaml alone: same params, same (deterministic CPU) result.
    retrain = run_script("worker.py", "--config", best_file)
    assert retrain.returncode == 0, (retrain.stdout + retrain.stderr)[-3000:]
    again = load_study(best_file, exported["study"]["study_name"]).trials[0]
    assert again.state.name == "COMPLETE"
    assert math.isclose(again.value, study.best_value, rel_tol=1e-4)

    # The seed's layout: --exp_id finds experiments/<id>/config.yaml and exports beside it.
    best_file.unlink()
    by_id = ["--exp_id", "tiny", "--experiments_dir", experiment.parent.parent]
    assert run_script("submit_study.py", *by_id, "--export_best").returncode == 0
    assert yaml.safe_load(best_file.read_text())["best_trial"]["number"] == study.best_trial.number
    assert "5/5 finished" in run_script("submit_study.py", *by_id, "--status").stdout

    # Resubmitting a finished study submits nothing; a larger budget extends it.
    out = run_script("submit_study.py", "--config", experiment, "--local", 1, "--n_trials", 5)
    assert out.returncode == 0 and len(finished(load_study(experiment))) == 5
    out = run_script("submit_study.py", "--config", experiment, "--local", 1, "--n_trials", 6)
    assert out.returncode == 0 and len(finished(load_study(experiment))) == 6


def test_worker_debug_run_prints_params_epochs_and_result(experiment):
    out = run_script("worker.py", "--config", experiment)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "trial 0 params: {'model.d_pos'" in out.stdout
    assert "trial 0 step 0:" in out.stdout and "trial 0 step 1:" in out.stdout
    assert "trial 0 COMPLETE: val_mae_mean =" in out.stdout


def test_each_trial_reads_the_yaml_fresh_and_recomputes_derived_dims(tmp_path):
    """The seed's dimension-mismatch bug: two trials in one process with different dims both train."""
    path = plugin_experiment(tmp_path, {"training.edit_yaml_to": 12})
    study = enqueue(path, {"model.d_pos": 6, "training.lr": 0.01}, {"model.d_pos": 12, "training.lr": 0.01})
    out = run_script("worker.py", "--config", path, "--trials", 2)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    trials = load_study(path).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    resolved = [yaml.safe_load((path.parent / "runs/tiny/trials" / str(n) / "config.yaml").read_text()) for n in (0, 1)]
    assert [r["model"]["d_in"] for r in resolved] == [7, 13]
    # trial 0 edited the YAML on disk; trial 1, in the same process, saw the edit
    assert [r["model"]["d_hidden"] for r in resolved] == [8, 12]
    assert [r["model"]["d_head"] for r in resolved] == [24, 36]
    assert study.study_name == "tiny"


def test_exception_and_nan_fail_only_their_trial(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 3, "training.misbehave": True})
    enqueue(path, {"model.d_pos": 2, "training.lr": 0.01}, {"model.d_pos": 4, "training.lr": 0.01})
    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    study = load_study(path)
    failed = {t.params["model.d_pos"]: t.user_attrs["fail_reason"] for t in study.trials if t.state.name == "FAIL"}
    assert failed[2] == "RuntimeError: boom: the trainer crashed"
    assert "metric is nan at step 0" in failed[4]
    assert len(finished(study)) == 3
    assert "Traceback" in (path.parent / "runs/tiny/trials/0/worker.log").read_text()


def test_status_shows_counts_budget_best_and_running_trials(tmp_path):
    path = plugin_experiment(tmp_path, {"training.sleep": 1.0, "training.epochs": 8, "study.n_trials": 1})
    enqueue(path, {"model.d_pos": 6, "training.lr": 0.01})
    slow = subprocess.Popen(
        [sys.executable, str(PROJECT / "worker.py"), "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: (path.parent / "runs/tiny/trials/0/checkpoint.pt").exists())
        out = run_script("submit_study.py", "--config", path, "--status")
        assert out.returncode == 0, out.stderr
        assert "RUNNING 1" in out.stdout and "progress [" in out.stdout and "0/1 finished" in out.stdout
        assert f"trial 0  host {os.uname().nodename}  pid {slow.pid}  age " in out.stdout
    finally:
        slow.send_signal(signal.SIGKILL)
        slow.wait()
    # The worker was killed: status notices, fails the trial and enqueues a retry of the same params...
    out = run_script("submit_study.py", "--config", path, "--status")
    assert "trial 0 FAIL: worker died: pid" in out.stdout and "WAITING 1" in out.stdout
    # ...which the next worker runs, continuing from the dead trial's last checkpoint.
    out = run_script("worker.py", "--config", path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    dead, retry = load_study(path).trials
    assert retry.state.name == "COMPLETE" and retry.user_attrs["retry_of"] == 0
    assert retry.params == dead.params
    assert sorted(retry.intermediate_values) == list(range(8))
    resumed_at = len(dead.intermediate_values)
    assert f"trial 1 step {resumed_at - 1}:" not in out.stdout and f"trial 1 step {resumed_at}:" in out.stdout


def start_local_run(path, workers):
    """submit_study.py --local K in the background, as a user's terminal runs it; stdout and stderr together."""
    command = [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path), "--local", str(workers)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.2)


def test_best_export_before_any_trial_is_a_clear_error(experiment):
    assert run_script("submit_study.py", "--config", experiment, "--no-submit_jobs").returncode == 0
    out = run_script("submit_study.py", "--config", experiment, "--export_best")
    assert out.returncode == 2 and "no COMPLETE trial yet" in out.stderr


def test_status_of_unknown_study_is_a_clear_error(experiment):
    out = run_script("submit_study.py", "--config", experiment, "--status")
    assert out.returncode == 2 and "no study 'tiny'" in out.stderr
    assert optuna.__version__ == "5.0.0"


def test_a_local_study_heals_when_one_of_its_workers_is_killed(tmp_path):
    path = plugin_experiment(tmp_path, {"training.sleep": 0.5, "training.epochs": 6, "study.n_trials": 4})
    launcher = start_local_run(path, 2)
    trials_dir = path.parent / "runs/tiny/trials"
    wait_for(
        lambda: any((d / "checkpoint.pt").exists() for d in trials_dir.glob("*")) if trials_dir.exists() else False
    )
    victim = next(t for t in load_study(path).get_trials() if t.state.name == "RUNNING" and "host" in t.user_attrs)
    os.kill(victim.user_attrs["pid"], signal.SIGKILL)
    out, _ = launcher.communicate(timeout=300)
    study = load_study(path)
    assert len(finished(study)) == 4, out[-3000:]
    assert launcher.returncode == 0, "the budget was met: a killed worker is no error of the run's"
    assert f"local worker {victim.user_attrs['pid']} was killed (SIGKILL)" in out, out[-3000:]
    assert study.trials[victim.number].state.name == "FAIL"
    retry = next(t for t in study.get_trials() if t.user_attrs.get("retry_of") == victim.number)
    assert retry.state.name == "COMPLETE" and retry.params == victim.params


def test_a_local_run_inside_a_batch_job_runs_workers_of_its_own(tmp_path):
    """Its workers are neither ranks nor array tasks of the job it runs in: each runs trials of its own."""
    path = plugin_experiment(tmp_path, {"training.sleep": 0.5, "training.epochs": 4, "study.n_trials": 4})
    job = {"SLURM_JOB_ID": "990002", "SLURM_ARRAY_JOB_ID": "990001", "SLURM_ARRAY_TASK_ID": "3"}
    job.update(SLURM_PROCID="0", SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost")
    out = run_script("submit_study.py", "--config", path, "--local", 2, env=job, timeout=180)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    trials = load_study(path).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4, [(t.number, t.state.name) for t in trials]
    assert len({t.user_attrs["pid"] for t in trials}) == 2, "both workers ran trials"
    assert not [t for t in trials if "retry_of" in t.user_attrs or "slurm_task" in t.user_attrs], "no trial ran twice"


def test_local_workers_each_get_gpus_of_their_own_where_the_machine_has_enough(tmp_path):
    """CUDA_VISIBLE_DEVICES as a machine with 3 GPUs sets it: 2 workers of 1 GPU each get one each; of 2, they share."""
    changes = {"training.sleep": 0.2, "training.epochs": 2, "study.n_trials": 4, "slurm.gpus_per_task": 1}
    path = plugin_experiment(tmp_path / "one", changes)
    out = run_script("submit_study.py", "--config", path, "--local", 2, env={"CUDA_VISIBLE_DEVICES": "4,5,7"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "GPUs of the local workers: 4 | 5 (CUDA_VISIBLE_DEVICES)" in out.stdout
    trials = load_study(path).get_trials()
    by_worker = {(t.user_attrs["pid"], t.user_attrs["cuda_visible_devices"]) for t in trials}
    assert len(by_worker) == 2 and {gpus for _, gpus in by_worker} == {"4", "5"}, by_worker

    path = plugin_experiment(tmp_path / "two", {**changes, "slurm.gpus_per_task": 2})
    out = run_script("submit_study.py", "--config", path, "--local", 2, env={"CUDA_VISIBLE_DEVICES": "4,5,7"})
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "2 local workers of 2 GPU(s) each share this machine's 3 GPU(s)" in out.stdout
    assert {t.user_attrs["cuda_visible_devices"] for t in load_study(path).get_trials()} == {"4,5,7"}


def test_a_budget_raised_by_the_flag_holds_at_the_next_submit_until_the_yaml_is_edited(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 2, "training.sleep": 0.01, "training.epochs": 1})

    def submit(*flags):
        out = run_script("submit_study.py", "--config", path, *flags)
        assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
        return out.stdout

    submit("--local", 1, "--n_trials", 3)
    out = submit("--local", 1)  # "submit again": the budget is the last one given, not the YAML's 2
    assert "3 finished trials, the last --n_trials (the YAML says 2)" in out and "3/3 finished" in out
    assert len(finished(load_study(path))) == 3
    by_hand = run_script("worker.py", "--config", path)  # a worker run by hand keeps it too
    assert "budget of 3 finished trials is covered" in by_hand.stdout, by_hand.stdout + by_hand.stderr

    versions = path.parent / "runs/tiny/config_versions"
    in_force = (versions / "current.json").read_text()
    path.write_text(path.read_text().replace("n_trials: 2", "n_trials: 5"))
    out = submit("--no-submit_jobs")  # a dry run of a live study shows what a submit would do, and does none of it
    assert "--array=0-1" in out and "budget: 3 -> 5" in out
    assert (versions / "current.json").read_text() == in_force
    assert load_study(path).user_attrs["n_trials"] == 3

    out = submit("--local", 1)  # the YAML was edited since: its budget counts
    assert "5/5 finished" in out and len(finished(load_study(path))) == 5


def test_a_paused_study_refuses_a_local_run_and_keeps_its_budget(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 1, "training.sleep": 0.01, "training.epochs": 1})
    assert run_script("submit_study.py", "--config", path, "--local", 1).returncode == 0
    assert run_script("submit_study.py", "--config", path, "--pause").returncode == 0
    out = run_script("submit_study.py", "--config", path, "--local", 1, "--n_trials", 4)
    assert out.returncode == 2 and "resume it first" in out.stderr
    study = load_study(path)
    assert study.user_attrs["n_trials"] == 1 and len(study.trials) == 1


def test_a_local_run_whose_trials_keep_failing_exits_1(tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.trainer": "no_result:train", "study.n_trials": 4})
    (path.parent / "no_result.py").write_text(
        "from examples.ishigami_lstm import prepare  # noqa: F401\n\ndef train(config, trial):\n    return None\n"
    )
    out = run_script("submit_study.py", "--config", path, "--local", 1)
    assert out.returncode == 1, (out.stdout + out.stderr)[-3000:]
    assert "4 trial(s) of the budget did not finish" in out.stderr
    assert [t.state.name for t in load_study(path).trials] == ["FAIL"] * 3  # three in a row stop the worker


def test_help_lists_the_flags_of_the_option_table():
    for script in ("submit_study.py", "worker.py"):
        out = run_script(script, "--help")
        assert out.returncode == 0, out.stderr
        assert "--n_trials" in out.stdout and "--study_name" in out.stdout
    assert "--max_concurrent_jobs" in run_script("submit_study.py", "--help").stdout


def test_a_repeated_config_is_answered_from_its_first_training_not_trained_again(tmp_path):
    one_config = {"model.d_pos": {"type": "categorical", "choices": [4]}}  # every sampler can only repeat it
    path = plugin_experiment(tmp_path, {"study.n_trials": 3, "study.sampler": {"seed": 0}, "search_space": one_config})
    out = run_script("worker.py", "--config", path, "--trials", 0)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "sampler: GPSampler and TPESampler by turns (default" in out.stdout
    trials = load_study(path).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert [t.user_attrs.get("duplicate_of") for t in trials] == [None, 0, 0]
    assert {t.value for t in trials} == {trials[0].value}
    assert trials[2].user_attrs["metrics"] == trials[0].user_attrs["metrics"]
    assert out.stdout.count("COMPLETE: val_mae_mean") == 1, "trained once"
    assert not (path.parent / "runs/tiny/trials/1").exists()


def test_workers_wait_for_a_running_twin_rather_than_burn_trials(tmp_path):
    """An empty search space: one config. The second worker waits for it and is answered from it."""
    changes = {"search_space": {}, "study.n_trials": 3, "training.sleep": 0.5, "training.epochs": 4}
    path = plugin_experiment(tmp_path, changes)
    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    trials = load_study(path).trials
    trained = [t for t in trials if t.state.name == "COMPLETE" and "duplicate_of" not in t.user_attrs]
    answered = [t for t in trials if t.user_attrs.get("duplicate_of") == trained[0].number]
    assert len(trained) == 1 and len(answered) == 2
    dropped = [t for t in trials if t.state.name == "FAIL"]
    assert len(dropped) <= 6, f"{len(dropped)} repeats of the running trial dropped in 2 s"


def test_ctrl_c_ends_a_worker_waiting_for_a_running_twin_cleanly(tmp_path):
    changes = {"search_space": {}, "study.n_trials": 3, "training.sleep": 1.0, "training.epochs": 30}
    path = plugin_experiment(tmp_path, changes)
    launcher = start_local_run(path, 2)
    journal_file = path.parent / "runs/tiny/journal.log"
    wait_for(lambda: journal_file.exists() and any(t.state.name == "FAIL" for t in load_study(path).get_trials()))
    time.sleep(1)
    launcher.send_signal(signal.SIGINT)
    out, _ = launcher.communicate(timeout=120)
    assert "received while waiting to claim a trial" in out, out[-3000:]
    assert "widen search_space" not in out
    dropped = [t for t in load_study(path).get_trials() if "duplicate of" in t.user_attrs.get("fail_reason", "")]
    assert len(dropped) <= 5, [t.user_attrs["fail_reason"] for t in dropped]


def test_status_of_a_study_submitted_before_the_budget_was_remembered(tmp_path):
    """Its last submission's budget, as status showed it then (the YAML's own was not kept with it)."""
    path = plugin_experiment(tmp_path, {"study.n_trials": 2})
    run = path.parent / "runs" / "tiny"
    run.mkdir(parents=True, mode=0o700)
    study = optuna.create_study(study_name="tiny", storage=journal.open_journal(run / "journal.log"))
    study.set_user_attr("n_trials", 5)
    assert "0/5 finished" in run_script("submit_study.py", "--config", path, "--status").stdout


def test_status_blames_the_trainer_only_for_its_own_failures(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 4})
    study = enqueue(path)
    for reason in ("duplicate of running trial 0", "cancelled", "worker died: 12_0 on node1 is gone"):
        trial = study.ask()
        trial.set_user_attr("fail_reason", reason)
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    out = run_script("submit_study.py", "--config", path, "--status").stdout
    assert "failed in the trainer" not in out
    assert "4 trial(s) not covered" in out
    trial = study.ask()
    trial.set_user_attr("fail_reason", "RuntimeError: boom")
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    assert "1 trial(s) failed in the trainer" in run_script("submit_study.py", "--config", path, "--status").stdout


def test_two_studies_from_one_folder_keep_their_own_best_export(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 1, "training.sleep": 0.01, "training.epochs": 1})
    assert run_script("submit_study.py", "--config", path, "--local", 1).returncode == 0
    out = run_script("submit_study.py", "--config", path, "--local", 1, "--study_name", "other")
    assert out.returncode == 0 and "best_trial_other.yaml" in out.stdout
    assert "of study tiny:" in (path.parent / "best_trial.yaml").read_text().splitlines()[0]
    assert "of study other:" in (path.parent / "best_trial_other.yaml").read_text().splitlines()[0]


def test_status_of_a_large_array_lists_what_needs_a_look_not_every_task(tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 100})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    study = load_study(path)
    study.set_user_attr("array_jobs", [{"job_id": "990001"}])  # an array long gone from SLURM
    x = optuna.distributions.FloatDistribution(0, 1)
    for task in range(60):
        trial = study.ask({"x": x})
        trial.set_user_attr("slurm_task", f"990001_{task}")
        if task == 7:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(trial, float(task))
    lines = run_script("submit_study.py", "--config", path, "--status").stdout.splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("990001_")]
    assert "990001_7" in listed, "a task whose trial failed is always listed"
    assert listed[-20:] == [f"990001_{t}" for t in range(40, 60)], "the last tasks show"
    assert len(listed) == 21 and "  (39 earlier array tasks ended with their trial finished: not listed)" in lines


@pytest.mark.parametrize(
    "shipped",
    [
        "config.example.yaml",
        "examples/trainer_api/config.yaml",
        "examples/plain_objective/config.yaml",
        "examples/ddp/trainer.yaml",
        "examples/ddp/objective.yaml",
    ],
)
def test_every_shipped_config_dry_runs_from_any_folder(tmp_path, shipped):
    """The configs a new user copies first: their code is found, their keys pass, the array file is written."""
    runs = tmp_path / "runs"
    out = run_script(
        "submit_study.py", "--config", PROJECT / shipped, "--no-submit_jobs", "--runs_dir", runs, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "dry run, nothing submitted" in out.stdout
    assert list(runs.glob("*/array_job.sbatch")), "the array file is written"
