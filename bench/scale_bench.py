"""Scale benchmark: one worker run and one `--status` against a journal study of N finished trials.

    python bench/scale_bench.py                  # N = 1000 and 10000
    python bench/scale_bench.py --full           # and N = 100000 (a ~0.5 GB journal, minutes to build)
    python bench/scale_bench.py --sizes 2000

The study is written as workers write it: one real worker run records a trial's ops (attributes,
ten reports, the tell: ~23 ops), and N copies of them, renumbered and with their own values, are
appended to the journal. Then timed, each a whole process: `python worker.py` (start, load,
reconcile, ask, a 0 s trial from bench/scale_trainer.py, tell) and `submit_study.py --status`,
first with the journal's snapshot deleted (every op replayed; that load then writes one), then
with it present; with --before DIR, first also with that copy of the tool (an older commit).
"""

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
CREATE_TRIAL = 4


def write_config(folder, budget):
    path = folder / "config.yaml"
    shutil.copy(PROJECT / "bench" / "scale_trainer.py", folder)  # the experiment's own code: beside its YAML
    config = {
        "study": {"study_name": "scale", "n_trials": budget, "trainer": "scale_trainer:train"},
        "slurm": {"walltime": "10", "gpus_per_task": 0, "signal_grace": 60},
        "search_space": {"model.x": {"type": "float", "low": 0.0, "high": 1.0}},
        "model": {"x": 0.5},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def run(script, config, *flags, project=PROJECT):
    """(wall s, CPU s) of one run: CPU time is what a busy shared machine inflates least."""
    started, cpu = time.perf_counter(), cpu_of_children()
    out = subprocess.run(
        [sys.executable, str(project / script), "--config", str(config), *flags],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return time.perf_counter() - started, cpu_of_children() - cpu


def cpu_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def build(folder, size):
    """A study of `size` finished trials, each written with the ops one real worker run wrote."""
    config = write_config(folder, 1)
    run("worker.py", config)
    log = folder / "runs" / "scale" / "journal.log"
    ops = [json.loads(line) for line in log.read_bytes().splitlines()]
    first = next(i for i, op in enumerate(ops) if op["op_code"] == CREATE_TRIAL)
    header, trial = ops[:first], ops[first:]
    rng = random.Random(0)
    workers = [f"{rng.getrandbits(64):016x}-{rng.getrandbits(32)}" for _ in range(64)]
    with open(log, "w") as f:
        f.writelines(json.dumps(op, separators=(",", ":")) + "\n" for op in header)
        for number in range(size):
            f.writelines(line + "\n" for line in renumbered(trial, number, rng, rng.choice(workers)))
    for cache in log.parent.glob("journal.log.snapshot*"):
        cache.unlink()
    return write_config(folder, size + 1000), log  # every timed worker run gets a trial to run


def renumbered(trial, number, rng, worker):
    x = rng.random()
    for op in trial:
        op = {**op, "worker_id": worker}
        if op["op_code"] != CREATE_TRIAL:
            op["trial_id"] = number
        if "param_value_internal" in op:
            op["param_value_internal"] = x
        if "intermediate_value" in op:
            op["intermediate_value"] = x + rng.random()
        if op.get("values"):
            op["values"] = [x]
        yield json.dumps(op, separators=(",", ":"))


def measure(size, repeats, before):
    """Side by side: `before` (another copy of the tool, if given), without the snapshot, with it."""
    with tempfile.TemporaryDirectory() as tmp:
        config, log = build(Path(tmp), size)
        row = {"trials": size, "journal MB": f"{log.stat().st_size / 1e6:.0f}"}
        variants = [("before", before, False)] if before else []
        for label, project, keep in variants + [("no snapshot", PROJECT, False), ("snapshot", PROJECT, True)]:
            if keep:
                run("submit_study.py", config, "--status")  # a load that replays the journal writes one
            for kind, script, flags in (("worker", "worker.py", ()), ("status", "submit_study.py", ("--status",))):
                times = []
                for _ in range(repeats):
                    if not keep:
                        for cache in log.parent.glob("journal.log.snapshot*"):
                            cache.unlink()
                    times.append(run(script, config, *flags, project=project))
                row[f"{kind}, {label}"] = min(times)
        return row


def floor():
    started, cpu = time.perf_counter(), cpu_of_children()
    subprocess.run([sys.executable, "-c", "import optuna, yaml"], check=True)
    return time.perf_counter() - started, cpu_of_children() - cpu


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--full", action="store_true", help="add N = 100000")
    parser.add_argument("--repeats", type=int, default=2, help="runs per figure; the fastest counts")
    parser.add_argument(
        "--before", type=Path, help="another copy of the tool to time too (git archive <commit> | tar -x -C DIR)"
    )
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")] + ([100000] if args.full else [])
    wall, cpu = min(floor() for _ in range(3))
    print(f"floor: python -c 'import optuna, yaml' {wall:.2f} s ({cpu:.2f} s CPU)")
    rows = [measure(size, args.repeats, args.before) for size in sizes]
    print("seconds of a whole process, wall (CPU)")
    print("  ".join(f"{c:>21}" for c in rows[0]))
    for row in rows:
        print("  ".join(f"{v[0]:>12.2f} ({v[1]:>5.2f})" if isinstance(v, tuple) else f"{v:>21}" for v in row.values()))
    for row in rows:
        for base in ("before", "no snapshot") if args.before else ("no snapshot",):
            worker = row[f"worker, {base}"][0] / row["worker, snapshot"][0]
            status = row[f"status, {base}"][0] / row["status, snapshot"][0]
            print(f"{row['trials']} trials, snapshot vs {base}: worker x{worker:.1f}, --status x{status:.1f} faster")
    return 0


if __name__ == "__main__":
    sys.exit(main())
