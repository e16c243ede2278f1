"""Arrays that fit the user's submit limits: what fits now, the rest by a chained job, the budget exact."""

import re
import subprocess

import pytest
from conftest import finished, load_study, plugin_experiment, run_script
from slurm_helpers import squeue, submitted_jobs, wait_for_jobs, wait_until

from parallel_optuna import attributes as attr

pytestmark = pytest.mark.slurm


@pytest.fixture
def qos_limit(site):
    """Sets the QOS normal's MaxSubmitJobsPerUser for one test; cleared after it."""

    def set_limit(jobs):
        subprocess.run(["sacctmgr", "-i", "modify", "qos", "normal", "set", f"MaxSubmitJobsPerUser={jobs}"], check=True)

    yield set_limit
    set_limit(-1)


def test_an_array_larger_than_the_qos_limit_is_submitted_in_parts_and_meets_the_budget(qos_limit, tmp_path):
    wait_until(lambda: not squeue("--me"), what="an empty queue: the limit counts every job of the user")
    path = plugin_experiment(tmp_path, {"study.n_trials": 6, "slurm.max_concurrent_jobs": 2})
    qos_limit(4)
    out = run_script("submit_study.py", "--config", path)
    assert out.returncode == 0, out.stdout + out.stderr
    first = submitted_jobs(out.stdout)
    assert "submitted array job" in out.stdout and ": 3 tasks" in out.stdout, out.stdout
    said = re.search(
        r"3 task\(s\) not submitted yet \(QOS normal MaxSubmitJobsPerUser=4, .*\): job (\d+) submits them", out.stdout
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
    wait_until(lambda: not squeue("--me"), what="an empty queue: the limit counts every job of the user")
    path = plugin_experiment(tmp_path, {"study.n_trials": 4})
    blocker = subprocess.run(
        ["sbatch", "--parsable", "--hold", "--wrap=true"], capture_output=True, text=True, check=True
    )
    try:
        qos_limit(2)
        out = run_script("submit_study.py", "--config", path)
        assert out.returncode == 1 and "submitted" not in out.stdout, out.stdout + out.stderr
        line = out.stderr.strip().splitlines()[-1]
        assert line.startswith("error: no room for the array under the QOS normal MaxSubmitJobsPerUser=2, 1 of your")
        assert "fix: submit again once some of your jobs have ended" in line
        assert not load_study(path).user_attrs.get(attr.ARRAY_JOBS), "nothing recorded as submitted"
    finally:
        subprocess.run(["scancel", blocker.stdout.strip()], check=True)
    wait_until(lambda: not squeue("--me"), what="the blocker to leave")


def test_a_limit_the_submit_cannot_read_is_one_line_naming_it(qos_limit, tmp_path):
    wait_until(lambda: not squeue("--me"), what="an empty queue: the limit counts every job of the user")
    path = plugin_experiment(tmp_path, {"study.n_trials": 4})
    modify = ["sacctmgr", "-i", "modify", "qos", "normal", "set"]
    subprocess.run([*modify, "GrpSubmitJobs=2"], check=True)  # a limit of the whole QOS: not read before
    try:
        out = run_script("submit_study.py", "--config", path)
    finally:
        subprocess.run([*modify, "GrpSubmitJobs=-1"], check=True)
    assert out.returncode == 1 and "submitted array job" not in out.stdout, out.stdout + out.stderr
    line = out.stderr.strip().splitlines()[-1]
    assert "the QOS's GrpSubmitJobs is full (QOSGrpSubmitJobsLimit" in line and "fix: submit again" in line, line
    assert not load_study(path).user_attrs.get(attr.ARRAY_JOBS), "nothing recorded as submitted"
