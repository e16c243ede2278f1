"""Arrays that fit the user's submit limits: what fits now, the rest by a chained job, the budget exact."""

import re
import subprocess

import pytest
from conftest import finished, load_study, plugin_experiment, run_script
from slurm_helpers import submitted_jobs, wait_for_jobs

from parallel_optuna import attributes as attr

pytestmark = pytest.mark.slurm


QOS = "limited"  # a QOS of the tests' own: the limits set on it leave every other job alone


@pytest.fixture
def qos_limit(accounting):
    """Sets a limit of the QOS `limited` (which root may use) for one test; cleared after it."""
    subprocess.run(["sacctmgr", "-i", "add", "qos", QOS], capture_output=True)  # already there: no error that matters
    subprocess.run(["sacctmgr", "-i", "modify", "user", "root", "set", f"qos+={QOS}"], capture_output=True, check=True)
    limits = set()

    def set_limit(name, jobs):
        modify = ["sacctmgr", "-i", "modify", "qos", QOS, "set", f"{name}={jobs}"]
        subprocess.run(modify, capture_output=True, check=True, timeout=60)
        limits.add(name)

    yield set_limit
    for name in sorted(limits):
        subprocess.run(["sacctmgr", "-i", "modify", "qos", QOS, "set", f"{name}=-1"], capture_output=True, timeout=60)


def test_an_array_larger_than_the_qos_limit_is_submitted_in_parts_and_meets_the_budget(qos_limit, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 6, "slurm.max_concurrent_jobs": 2, "slurm.qos": QOS})
    qos_limit("MaxSubmitJobsPerUser", 4)
    out = run_script("submit_study.py", "--config", path)
    assert out.returncode == 0, out.stdout + out.stderr
    first = submitted_jobs(out.stdout)
    assert "submitted array job" in out.stdout and ": 3 tasks" in out.stdout, out.stdout
    said = re.search(
        r"3 task\(s\) not submitted yet \(QOS limited MaxSubmitJobsPerUser=4, .*\): job (\d+) submits them", out.stdout
    )
    assert said, out.stdout
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert f"job {said.group(1)} submits them" in status, status
    wait_for_jobs([*first, said.group(1)])
    study = load_study(path)
    arrays = [j["job_id"] for j in study.user_attrs[attr.ARRAY_JOBS]]
    assert len(arrays) == 2 and arrays[0] == first[0], "the chained job submitted the second part"
    wait_for_jobs(arrays)
    study = load_study(path)
    assert len(finished(study)) == 6 and len(study.trials) == 6, "the budget exactly, no trial twice"
    assert study.user_attrs[attr.NEXT_PART] is None, "nothing is left for later"
    tasks = [t.user_attrs[attr.SLURM_TASK] for t in study.trials]
    assert len(set(tasks)) == 6 and {t.split("_")[0] for t in tasks} == set(arrays), "one task a trial"


def test_no_room_under_the_limit_is_one_line_and_submits_nothing(qos_limit, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 4, "slurm.qos": QOS})
    blocker = ["sbatch", "--parsable", "--hold", f"--qos={QOS}", "--wrap=true"]
    blocker = subprocess.run(blocker, capture_output=True, text=True, check=True).stdout.strip()
    try:
        qos_limit("MaxSubmitJobsPerUser", 2)
        out = run_script("submit_study.py", "--config", path)
    finally:
        subprocess.run(["scancel", blocker], check=True)
    assert out.returncode == 1 and "submitted" not in out.stdout, out.stdout + out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: no room for the array under the QOS limited MaxSubmitJobsPerUser=2, 1 of your")
    assert "fix: submit again once some of your jobs have ended" in line
    assert not load_study(path).user_attrs.get(attr.ARRAY_JOBS), "nothing recorded as submitted"
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert "4 task(s) not submitted yet (QOS limited MaxSubmitJobsPerUser=2" in status, status
    assert "no job submits them: submit again" in status, status


def test_a_limit_the_submit_cannot_read_is_one_line_naming_it(qos_limit, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 4, "slurm.qos": QOS})
    qos_limit("GrpSubmitJobs", 2)  # a limit of the whole QOS: the submit does not read it
    out = run_script("submit_study.py", "--config", path)
    assert out.returncode == 1 and "submitted array job" not in out.stdout, out.stdout + out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "the QOS's GrpSubmitJobs is full (QOSGrpSubmitJobsLimit" in line and "fix: submit again" in line, line
    assert not load_study(path).user_attrs.get(attr.ARRAY_JOBS), "nothing recorded as submitted"


def test_a_chained_job_cancelled_by_hand_is_said_and_a_submit_tops_up(qos_limit, tmp_path):
    path = plugin_experiment(tmp_path, {"study.n_trials": 3, "slurm.max_concurrent_jobs": 1, "slurm.qos": QOS})
    qos_limit("MaxSubmitJobsPerUser", 2)
    out = run_script("submit_study.py", "--config", path)
    chained = re.search(r"2 task\(s\) not submitted yet .*: job (\d+) submits them", out.stdout)
    assert out.returncode == 0 and chained, out.stdout + out.stderr
    subprocess.run(["scancel", chained.group(1)], check=True)
    wait_for_jobs(submitted_jobs(out.stdout))
    status = run_script("submit_study.py", "--config", path, "--status").stdout
    assert f"job {chained.group(1)} has left the queue without submitting them: submit again" in status, status
    again = run_script("submit_study.py", "--config", path)
    assert again.returncode == 0 and "not submitted yet" not in again.stdout, again.stdout + again.stderr
    wait_for_jobs(submitted_jobs(again.stdout))
    study = load_study(path)
    assert len(finished(study)) == 3 and len(study.trials) == 3 and study.user_attrs[attr.NEXT_PART] is None
