"""Scale benchmark: what `make status` and a worker's start-up cost as a study grows.

    python bench/status_bench.py                  # studies of 100, 1000 and 5000 trials
    python bench/status_bench.py --sizes 200,2000

For each size, a journal-file study is filled with finished trials plus 50 RUNNING trials that
belong to SLURM array tasks. A stand-in `squeue` (first on PATH) counts its calls and lists the
tasks as running. Measured: the time of `submit_study.py --status`, of one reconcile (what each
worker does once at start), and the number of squeue calls each makes, side by side.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from parallel_optuna import liveness  # noqa: E402
from parallel_optuna.config import load_config
from parallel_optuna.study import open_storage

SQUEUE = """#!/bin/bash
echo x >> "$SQUEUE_CALLS"
for i in $(seq 0 49); do echo "900_$i|RUNNING|1:00|None"; done
"""


def build(folder, size):
    config_path = folder / "config.yaml"
    config_path.write_text(
        yaml.safe_dump(
            {
                "study": {"study_name": "scale", "n_trials": size + 50, "pruner": {"name": "NopPruner"}},
                "slurm": {"walltime": "10", "gpus_per_task": 0, "signal_grace": 60},
                "search_space": {"model.x": {"type": "float", "low": 0.0, "high": 1.0}},
                "model": {"x": 0.5},
            }
        )
    )
    config = load_config(config_path)
    study = optuna.create_study(study_name="scale", storage=open_storage(config))
    x = optuna.distributions.FloatDistribution(0, 1)
    for i in range(size):
        study.add_trial(optuna.trial.create_trial(params={"model.x": i / size}, distributions={"model.x": x}, value=i))
    for task in range(50):
        trial = study.ask({"model.x": x})
        trial.set_user_attr("slurm_task", f"900_{task}")
        trial.set_user_attr("host", "node-a")
    study.set_user_attr("array_jobs", [{"job_id": "900", "tasks": 50}])
    return config_path, config


def measure(size):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "bin").mkdir()
        squeue = folder / "bin" / "squeue"
        squeue.write_text(SQUEUE)
        squeue.chmod(0o755)
        calls = folder / "calls"
        env = {**os.environ, "PATH": f"{folder / 'bin'}:{os.environ['PATH']}", "SQUEUE_CALLS": str(calls)}
        config_path, config = build(folder, size)

        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, str(PROJECT / "submit_study.py"), "--config", str(config_path), "--status"],
            capture_output=True,
            text=True,
            env=env,
        )
        status_s = time.perf_counter() - started
        assert out.returncode == 0, out.stderr
        status_calls = len(calls.read_text().splitlines())

        os.environ.update(PATH=env["PATH"], SQUEUE_CALLS=str(calls))
        calls.write_text("")
        study = optuna.load_study(study_name="scale", storage=open_storage(config))
        started = time.perf_counter()
        failed = liveness.reconcile(study, config)
        reconcile_s = time.perf_counter() - started
        assert failed == [], "every task is listed as running"
        return size, status_s, status_calls, reconcile_s, len(calls.read_text().splitlines())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,5000")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    rows = [measure(int(n)) for n in args.sizes.split(",")]
    print(f"{'trials':>8} {'status s':>10} {'squeue calls':>13} {'reconcile s':>12} {'squeue calls':>13}")
    for size, status_s, status_calls, reconcile_s, calls in rows:
        print(f"{size:>8} {status_s:>10.2f} {status_calls:>13} {reconcile_s:>12.3f} {calls:>13}")
    small, large = rows[0], rows[-1]
    print(
        f"{large[0] // small[0]}x the trials: status x{large[1] / small[1]:.1f} time, "
        f"reconcile x{large[3] / small[3]:.1f} time, squeue calls {small[2]} -> {large[2]} (status), "
        f"{small[4]} -> {large[4]} (reconcile)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
