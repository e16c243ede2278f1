"""Makespan benchmark: the project's job array against a bare SLURM array doing the same per-task work.

    python bench/makespan_bench.py                     # 8 trials of 5 s, %2, once each
    python bench/makespan_bench.py --repeats 3         # full: the median of 3 runs each
    python bench/makespan_bench.py --trials 40 --seconds 1 --limit 4 --packing 1,10 --repeats 3   # trials_per_task

Both run on the local cluster (scripts/local_cluster.sh). The bare array is `sbatch --array=0-7%2
--wrap "sleep 5"` with the resources the project's array file asks for; the project's array is
`submit_study.py` with a trainer that sleeps 5 s per trial. Each makespan runs from the submitting
command to the end of the array's last task (polling squeue); the ratio is project / bare.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent


def command(words, timeout=120):
    """Run a command; its stdout, or exit 2 with one line naming it."""
    try:
        out = subprocess.run(words, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        sys.exit(f"error: {words[0]}: {e}; fix: start the cluster (sudo bash scripts/local_cluster.sh up)")
    if out.returncode != 0:
        sys.exit(f"error: {' '.join(words[:2])} exited {out.returncode}: {out.stderr.strip()[:300]}")
    return out.stdout


def wait_for(job_ids, timeout=900):
    deadline = time.time() + timeout
    while command(["squeue", "--noheader", "--array", f"--jobs={','.join(job_ids)}", "--format=%i"]).strip():
        if time.time() > deadline:
            sys.exit(f"error: jobs {job_ids} still queued after {timeout} s; fix: check `squeue` and the node")
        time.sleep(0.2)
    return time.perf_counter()


def experiment(folder, trials, seconds, limit, per_task=1):
    shutil.copy(PROJECT / "bench" / "sleep_trainer.py", folder)  # the experiment's own code: beside its YAML
    config = {
        "study": {
            "study_name": "makespan",
            "n_trials": trials,
            "trainer": "sleep_trainer:train",
            "optimization_metric": "loss",
            "sampler": {"name": "RandomSampler", "seed": 0},
            "pruner": {"name": "NopPruner"},
        },
        "slurm": {
            "walltime": "10",
            "gpus_per_task": 0,
            "mem_per_cpu": "500M",
            "max_concurrent_jobs": limit,
            "trials_per_task": per_task,
        },
        "search_space": {"model.x": {"type": "float", "low": 0.0, "high": 1.0}},
        "model": {"x": 0.5},
        "training": {"seconds": seconds},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def project_makespan(trials, seconds, limit, per_task=1):
    """(makespan, job launches) of the project's array."""
    with tempfile.TemporaryDirectory() as tmp:
        path = experiment(Path(tmp), trials, seconds, limit, per_task)
        started = time.perf_counter()
        out = command([sys.executable, str(PROJECT / "submit_study.py"), "--config", str(path)])
        jobs = [line.split()[3].rstrip(":") for line in out.splitlines() if line.startswith("submitted array job")]
        if not jobs:
            sys.exit(f"error: submit_study.py submitted no array: {out.strip()[-300:]}")
        launches = sum(int(line.split()[4]) for line in out.splitlines() if line.startswith("submitted array job"))
        return wait_for(jobs) - started, launches


def bare_makespan(trials, seconds, limit):
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        job = command(
            ["sbatch", "--parsable", f"--array=0-{trials - 1}%{limit}", "--ntasks=1", "--cpus-per-task=1"]
            + ["--mem-per-cpu=500M", "--time=10", f"--output={tmp}/%A_%a.out", f"--wrap=sleep {seconds}"]
        ).strip()
        return wait_for([job.split(";")[0]]) - started


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0, help="work per trial")
    parser.add_argument("--limit", type=int, default=2, help="array tasks at once (%%K)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each; the median is reported")
    parser.add_argument("--packing", default="1", help="slurm.trials_per_task values to run, comma-separated")
    args = parser.parse_args()
    work = (args.trials, args.seconds, args.limit)
    packings = [int(n) for n in args.packing.split(",")]
    bare, project = [], {n: [] for n in packings}
    for _ in range(args.repeats):  # interleaved, so that a busy moment hits every variant
        bare.append(bare_makespan(*work))
        for n in packings:
            project[n].append(project_makespan(*work, n))
    bare_s = statistics.median(bare)
    print(f"{args.trials} trials of {args.seconds:g} s, %{args.limit}, median of {args.repeats}")
    print(f"bare SLURM array            {bare_s:6.1f} s   launches {args.trials:4d}   runs: {runs(bare)}")
    for n, results in project.items():
        makespan = statistics.median(s for s, _ in results)
        launches = results[0][1]
        print(
            f"project's array, N = {n:<4d}  {makespan:6.1f} s   launches {launches:4d}   x{makespan / bare_s:.2f} "
            f"of bare   runs: {runs(s for s, _ in results)}"
        )
    return 0


def runs(seconds):
    return ", ".join(f"{s:.1f}" for s in seconds)


if __name__ == "__main__":
    sys.exit(main())
