"""Look at a study: the report's plots, the timeline's requeue marks, the dashboard over HTTP."""

import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timedelta

import optuna
import pytest
from conftest import PROJECT, load_study, run_script, run_script_without, write_experiment

from parallel_optuna import report
from parallel_optuna.config import load_config
from parallel_optuna.study import open_storage

PLOTS = ("optimization_history", "param_importances", "parallel_coordinate", "intermediate_values", "timeline")
X = optuna.distributions.FloatDistribution(0, 1)


def test_report_plots_a_finished_local_study(tmp_path):
    pruner = {"name": "MedianPruner", "n_startup_trials": 1}
    path = write_experiment(tmp_path / "exp", {"study.n_trials": 4, "study.pruner": pruner, "training.epochs": 3})
    assert run_script("submit_study.py", "--config", path, "--local", 2).returncode == 0
    out = run_script("submit_study.py", "--config", path, "--report")
    assert out.returncode == 0, out.stdout + out.stderr
    folder = path.parent / "runs/tiny/report"
    for name in PLOTS:
        png = folder / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000, name
    assert not (folder / "pareto_front.png").exists(), "one objective: no Pareto front"
    assert f"{folder}/" in out.stdout and "skipped" not in out.stdout


def created_study(tmp_path):
    path = write_experiment(tmp_path / "exp")
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    return path, load_study(path)


def test_the_timeline_marks_requeues_from_the_worker_log_and_links_retries(tmp_path):
    path, study = created_study(tmp_path)
    start = datetime.now().replace(microsecond=0)
    times = [start + timedelta(seconds=s) for s in (0, 50, 80)]
    log = tmp_path / "worker.log"
    log.write_text(
        f"{times[0]:%Y-%m-%d %H:%M:%S},001 INFO worker: trial 0 params: {{'x': 0.5}}\n"
        f"{times[1]:%Y-%m-%d %H:%M:%S},002 INFO worker: trial 0 checkpointed before the walltime; "
        "requeueing its task 7_0\n"
        f"{times[2]:%Y-%m-%d %H:%M:%S},003 INFO worker: trial 0 params: {{'x': 0.5}}\n"
    )
    requeued = study.ask({"x": X})
    requeued.set_user_attr("requeues", 1)
    requeued.set_user_attr("log_path", str(log))
    study.tell(requeued, 1.0)
    failed = study.ask({"x": X})
    study.tell(failed, state=optuna.trial.TrialState.FAIL)
    study.enqueue_trial(failed.params, user_attrs={"retry_of": failed.number})
    study.tell(study.ask({"x": X}), 0.5)

    config = load_config(path)
    frozen = study.trials[requeued.number]
    assert report.requeue_gaps(frozen, config) == [
        (times[1] + timedelta(microseconds=2000), times[2] + timedelta(microseconds=3000))
    ]
    labels = [t.get_text() for t in report.timeline(study, config).get_legend().get_texts()]
    assert {"queued after a requeue", "resumed", "retry of a failed trial"} <= set(labels)


@pytest.mark.parametrize(("flag", "module"), [("--report", "matplotlib"), ("--dashboard", "optuna_dashboard")])
def test_a_missing_extra_is_named_with_its_pip_command(tmp_path, flag, module):
    path, _ = created_study(tmp_path)
    out = run_script_without(module, "submit_study.py", "--config", str(path), flag)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and f"pip install {module.replace('_', '-')}" in out.stderr


def get(url, method="GET"):
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=30) as response:
        return json.loads(response.read())


def test_the_dashboard_serves_our_trials_on_localhost_read_only(tmp_path):
    path, study = created_study(tmp_path)
    for value in (0.3, 0.1):
        study.tell(study.ask({"x": X}), value)
    server = subprocess.Popen(
        [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path), "--dashboard", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first, ssh = server.stdout.readline(), server.stdout.readline()
        assert "to this very node" in ssh
        port = re.search(r"http://127\.0\.0\.1:(\d+)/dashboard", first)[1]
        assert f"ssh -N -L {port}:127.0.0.1:{port} " in ssh
        studies = get(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        assert [s["study_name"] for s in studies] == ["tiny"]
        detail = get(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}")
        assert [(t["number"], t["values"]) for t in detail["trials"]] == [(0, [0.3]), (1, [0.1])]
        with pytest.raises(urllib.error.HTTPError, match="403"):
            get(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}", method="DELETE")
        assert len(load_study(path).trials) == 2
        # Ctrl-C while a response is still being written: a browser slow to read the 6 MB bundle
        slow_reader = socket.create_connection(("127.0.0.1", int(port)))
        slow_reader.sendall(b"GET /static/bundle.js HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        slow_reader.recv(1)  # the response has begun, and fills the socket's buffers
        server.send_signal(signal.SIGINT)
        time.sleep(1)
        slow_reader.close()
        assert server.wait(timeout=60) == 0, "Ctrl-C stops the dashboard cleanly, even mid-response"
    finally:
        if server.poll() is None:  # a failure above: do not hide it behind a hanging server
            server.kill()
            server.wait()


def test_a_multi_objective_study_also_gets_its_pareto_front(tmp_path):
    path = write_experiment(tmp_path / "exp")
    config = load_config(path)
    study = optuna.create_study(storage=open_storage(config), study_name="tiny", directions=["minimize", "maximize"])
    for x in (0.1, 0.5, 0.9):
        study.tell(study.ask({"x": X}), [x, x * x])
    assert report.write_report(study, config) == 0
    assert (path.parent / "runs/tiny/report/pareto_front.png").stat().st_size > 5000
