"""End to end on a real single-node SLURM cluster: real sbatch, real storage, real training."""

import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import finished, load_study, run_script, write_experiment
from slurm_helpers import job_ids, submitted_jobs, wait_for_jobs, wait_until

pytestmark = pytest.mark.slurm

GPU = {"slurm.gpus_per_task": 1, "slurm.gpu_type": "rtx_4090"}


def submit(path, *flags):
    out = run_script("submit_study.py", "--config", path, *flags)
    assert out.returncode == 0, out.stdout + out.stderr
    return submitted_jobs(out.stdout), out


def states(study):
    return sorted(t.state.name for t in study.get_trials())


def max_overlap(trials):
    """Most trials running at the same instant, from their start and finish times."""
    events = sorted([(t.datetime_start, 1) for t in trials] + [(t.datetime_complete, -1) for t in trials])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_array_of_8_with_3_concurrent_one_gpu_each(slurm, tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 8, "slurm.max_concurrent_jobs": 3, **GPU})
    jobs, out = submit(path)
    assert len(jobs) == 1 and "squeue --me --array" in out.stdout
    wait_for_jobs(jobs)
    study = load_study(path)
    done = finished(study)
    assert len(done) == 8 and states(study).count("FAIL") == 0
    assert max_overlap(done) <= 3
    tasks = [t.user_attrs["slurm_task"] for t in done]
    assert len(set(tasks)) == 8 and all(task.startswith(f"{jobs[0]}_") for task in tasks)
    for t in done:
        assert t.user_attrs["cuda_visible_devices"] in {"0", "1", "2", "3"}
        assert t.user_attrs["slurm_array_job_id"] == jobs[0] and t.user_attrs["node"] == slurm
        assert Path(t.user_attrs["slurm_out"]).exists() and Path(t.user_attrs["slurm_err"]).exists()
        assert f"trial {t.number} COMPLETE" in Path(t.user_attrs["slurm_out"]).read_text() or t.state.name == "PRUNED"
    for a in done:  # trials that ran at the same time had different GPUs
        for b in done:
            if (
                a.number < b.number
                and a.datetime_start < b.datetime_complete
                and b.datetime_start < a.datetime_complete
            ):
                assert a.user_attrs["cuda_visible_devices"] != b.user_attrs["cuda_visible_devices"]
    status = run_script("submit_study.py", "--config", path, "--status")
    assert "8/8 finished" in status.stdout
    assert f"{jobs[0]}_0" in status.stdout and "COMPLETE" in status.stdout and "optuna_" in status.stdout


def test_dry_run_submits_nothing(slurm, experiment):
    before = job_ids()
    _, out = submit(experiment, "--no-submit_jobs")
    assert "#SBATCH --array=0-3%2" in out.stdout and "dry run, nothing submitted" in out.stdout
    assert job_ids() <= before


@pytest.mark.parametrize(
    "changes,key",
    [({"slurm.mem_per_cpu": "64G"}, "slurm.mem_per_cpu"), ({"slurm.partition": "nope"}, "slurm.partition")],
)
def test_a_request_the_cluster_cannot_meet_is_refused_before_a_study_exists(slurm, tmp_path, changes, key):
    path = write_experiment(tmp_path / "exp", changes)
    before = job_ids()
    out = run_script("submit_study.py", "--config", path)
    err = out.stderr.strip()
    assert out.returncode == 2 and "\n" not in err and f"{path}: {key}: sbatch refuses the request" in err, err
    assert not (path.parent / "runs").exists() and job_ids() <= before


def test_cancel_then_resubmit_tops_up_to_exactly_the_budget(slurm, tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 6, "slurm.max_concurrent_jobs": 2})
    jobs, _ = submit(path)
    study = load_study(path)
    wait_until(lambda: len(finished(study)) >= 2, what="2 finished trials")
    subprocess.run(["scancel", jobs[0]], check=True)
    wait_for_jobs(jobs)
    have = len(finished(study))
    assert have < 6
    # Re-submitting fails the cancelled tasks' trials, retries them and asks for the missing tasks only.
    jobs2, out = submit(path)
    missing = 6 - have
    assert f"submitted array job {jobs2[0]}: {missing} tasks" in out.stdout
    wait_for_jobs(jobs2)
    study = load_study(path)
    assert len(finished(study)) == 6
    assert not [t for t in study.get_trials() if t.state.name in ("RUNNING", "WAITING")]
    for t in study.get_trials():
        if t.state.name == "FAIL":
            assert t.user_attrs["fail_reason"].startswith("worker died")
    # A larger budget extends the finished study.
    jobs3, out = submit(path, "--n_trials", 7)
    assert f"submitted array job {jobs3[0]}: 1 tasks" in out.stdout
    wait_for_jobs(jobs3)
    assert len(finished(load_study(path))) == 7


def test_sbatch_by_hand_adds_a_worker_to_the_same_study(slurm, tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 2})
    submit(path, "--no-submit_jobs")
    script = path.parent / "runs" / "tiny" / "array_job.sbatch"
    job = subprocess.run(
        ["sbatch", "--parsable", "--array=0", str(script)], capture_output=True, text=True, check=True
    ).stdout.strip()
    wait_for_jobs([job])
    study = load_study(path)
    assert len(finished(study)) == 1 and study.trials[0].user_attrs["slurm_array_job_id"] == job


def test_cpu_only_array(slurm, tmp_path):
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 2, "slurm.gpus_per_task": 0})
    jobs, _ = submit(path)
    wait_for_jobs(jobs)
    study = load_study(path)
    assert len(finished(study)) == 2
    assert all(t.user_attrs.get("cuda_visible_devices") is None for t in study.trials)


@pytest.mark.slurm
def test_packed_trials_meet_the_budget_exactly_in_fewer_tasks(slurm, tmp_path):
    """slurm.trials_per_task 2: 5 trials in max(ceil(5 / 2), K=2) = 3 tasks, each running at most 2."""
    changes = {"study.n_trials": 5, "slurm.trials_per_task": 2, "slurm.max_concurrent_jobs": 2, "training.epochs": 1}
    path = write_experiment(tmp_path / "exp", changes)
    out = run_script("submit_study.py", "--config", path)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = submitted_jobs(out.stdout)
    assert f"submitted array job {jobs[0]}: 3 tasks" in out.stdout
    wait_for_jobs(jobs)
    trials = load_study(path).trials
    assert [t.state.name for t in trials].count("COMPLETE") + [t.state.name for t in trials].count("PRUNED") == 5
    assert len(trials) == 5, "the budget is exact: no task starts a sixth trial"
    per_task = Counter(t.user_attrs["slurm_task"] for t in trials)
    assert max(per_task.values()) == 2 and sum(per_task.values()) == 5 and len(per_task) <= 3, per_task
