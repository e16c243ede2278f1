"""Per-trial overhead: one array task running one trial (`worker.py --trials 1`), its wall time split by phase.

    python bench/overhead_bench.py                                  # this tree, studies of 0 and 100 trials
    python bench/overhead_bench.py --before /tmp/before --sizes 0,100,400 --repeats 5

Each run is a whole process (`worker.py` with a 0 s trainer, bench/scale_trainer.py) against a fresh copy
of a journal study of N finished trials (written as bench/scale_bench.py writes them), with the default
sampler (GP and TPE by turns) on two float params. The YAML was saved a moment before, as right after a
submit or an edit. A probe imports the worker, wraps its phases with timers and runs its main(); time is
given to the innermost phase running (the sampler's inside the claim, say), so the phases add up to the
total. With --before DIR the same runs time another copy of the tool (`git archive <commit>`), interleaved
with this one's; the medians are printed side by side.
"""

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
PHASES = {  # phase: (module, function names in it), the worker's view of each
    "config read": ("worker", ["read_config", "pinned_config"]),
    "storage open (journal load)": ("worker", ["open_storage"]),
    "study open (sampler build)": ("worker", ["open_study"]),
    "liveness (reconcile)": ("parallel_optuna.liveness", ["reconcile", "fail_stale"]),
    "user code import": ("worker", ["load_user_code"]),
    "GP imports (before the turn)": ("parallel_optuna.samplers", ["import_models"]),
    "ask turn wait": ("parallel_optuna.samplers", ["one_ask_at_a_time"]),
    "ask (storage, checks)": ("worker", ["claim_trial"]),
    "train": ("worker", ["load_trainer"]),
    "trial files, owner, tell": ("worker", ["run_trial"]),
    "checkpoint clean": ("worker", ["clean_checkpoints"]),
}
SAMPLER_METHODS = ("infer_relative_search_space", "sample_relative", "sample_independent", "before_trial")


# ---------------------------------------------------------------- the probe: runs inside the timed process
class Clock:
    """Exclusive time per phase: entering a phase pauses the one it was called from."""

    def __init__(self):
        self.spent, self.stack, self.since = {}, ["other"], time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name):
        self.switch()
        self.stack.append(name)
        try:
            yield
        finally:
            self.switch()
            self.stack.pop()

    def switch(self):
        now = time.perf_counter()
        self.spent[self.stack[-1]] = self.spent.get(self.stack[-1], 0.0) + now - self.since
        self.since = now


def timed(clock, name, function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with clock.phase(name):
            return function(*args, **kwargs)

    return wrapper


def timed_context(clock, name, manager):
    """A context manager whose entering (waiting for a lock) is the phase."""

    @contextlib.contextmanager
    def wrapper(*args, **kwargs):
        with clock.phase(name):
            entered = manager(*args, **kwargs)
            entered.__enter__()
        try:
            yield
        finally:
            entered.__exit__(None, None, None)

    return wrapper


def probe(project, out, argv):
    started = float(os.environ["OVERHEAD_SPAWNED"])
    clock = Clock()
    clock.spent["python start"] = time.time() - started
    sys.path.insert(0, str(project))
    with clock.phase("imports"):
        import importlib

        import optuna

        worker = importlib.import_module("worker")
    for name, (module_name, functions) in PHASES.items():
        module = importlib.import_module(module_name)
        for function in functions:
            original = getattr(module, function, None)
            if original is None:
                continue
            if name == "ask turn wait":
                setattr(module, function, timed_context(clock, name, original))
            elif name == "train":
                setattr(module, function, lambda *a, _load=original: timed(clock, "train", _load(*a)))
            else:
                setattr(module, function, timed(clock, name, original))
    for sampler in (optuna.samplers.GPSampler, optuna.samplers.TPESampler, optuna.samplers.RandomSampler):
        for method in SAMPLER_METHODS:
            setattr(sampler, method, timed(clock, "sampler (GP fit, imports in it)", getattr(sampler, method)))
    code = worker.main(argv)
    clock.switch()
    clock.spent["ended"] = time.time()
    Path(out).write_text(json.dumps({"code": code, "spent": clock.spent}))
    return 0


# ---------------------------------------------------------------- the bench: builds studies, runs probes
def write_config(folder, budget):
    shutil.copy(PROJECT / "bench" / "scale_trainer.py", folder)
    config = {
        "study": {"study_name": "scale", "n_trials": budget, "trainer": "scale_trainer:train"},
        "slurm": {"walltime": "10", "gpus_per_task": 0, "signal_grace": 60},
        "search_space": {
            "model.x": {"type": "float", "low": 0.0, "high": 1.0},
            "model.y": {"type": "float", "low": 0.0, "high": 1.0},
        },
        "model": {"x": 0.5, "y": 0.5},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def build(folder, size):
    """A study of `size` finished trials (scale_bench's way), then its YAML with room for more trials."""
    sys.path.insert(0, str(PROJECT / "bench"))
    import scale_bench

    scale_bench.write_config = write_config  # two params, as a small real space has
    scale_bench.build(folder, size)
    path = write_config(folder, size + 50)  # the default sampler: GP_MAX_TRIALS is not passed
    adopt = "from parallel_optuna import config_versions as v; import sys; v.load(sys.argv[1], {}, worker=True)"
    subprocess.run([sys.executable, "-c", adopt, str(path)], cwd=PROJECT, check=True)  # as the submit adopts it
    return path


def run_once(project, study, workdir):
    """{phase: seconds} of one worker process on a fresh copy of the study."""
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.copytree(study, workdir)
    config = workdir / "config.yaml"
    os.utime(config)  # saved a moment ago: right after a submit or an edit
    out = workdir / "phases.json"
    env = {**os.environ, "OVERHEAD_SPAWNED": repr(time.time())}
    command = [sys.executable, __file__, "--probe", str(project), str(out), "--", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    ended = time.time()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    spent = result["spent"]
    spent["exit"] = ended - spent.pop("ended")
    return spent


def table(sizes, variants, results):
    names = list(dict.fromkeys(p for runs in results.values() for run in runs for p in run))
    for size in sizes:
        print(f"\nstudy of {size} finished trials: median seconds of {len(results[size, variants[0][0]])} runs")
        print(f"{'phase':34}" + "".join(f"{label:>12}" for label, _ in variants))
        for name in names + ["total"]:
            row = []
            for label, _ in variants:
                runs = results[size, label]
                row.append(statistics.median(sum(r.values()) if name == "total" else r.get(name, 0.0) for r in runs))
            ratio = f"   x{row[0] / row[-1]:.2f}" if len(row) > 1 and row[-1] > 0.0005 and name == "total" else ""
            print(f"{name:34}" + "".join(f"{v:12.3f}" for v in row) + ratio)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,100", help="finished trials in the study, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", type=Path, help="another copy of the tool, timed interleaved with this one")
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    variants = ([("before", args.before.resolve())] if args.before else []) + [("this", PROJECT)]
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1, 5, 15 min)")
    results = {(size, label): [] for size in sizes for label, _ in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            study, workdir = Path(tmp) / f"study{size}", Path(tmp) / "run"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir()
            build(workdir, size)  # where it runs: the versions in force name the YAML's path
            shutil.move(workdir, study)
            for _ in range(args.repeats):  # interleaved: a busy moment hits every variant
                for label, project in variants:
                    results[size, label].append(run_once(project, study, Path(tmp) / "run"))
    table(sizes, variants, results)
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        sys.exit(probe(sys.argv[2], sys.argv[3], sys.argv[5:]))
    sys.exit(main())
