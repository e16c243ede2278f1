"""A big start: K array tasks asking for their first trial at once, on a study of N finished trials.

    python bench/start_bench.py                                   # K = 16, N = 0, 100, 400
    python bench/start_bench.py --workers 8,32 --sizes 0,100,400 --modes this,nohurry,none

Two measurements, each with the default sampler (GP and TPE by turns) on four float params:

- asks: one process times one ask (study.ask() and the params sampled, a fresh sampler as in a fresh
  task) of each sampler with R trials RUNNING beside the N finished ones. Taking turns makes the
  asks of a start serial: the figures for K = 64 and 256 are summed from these (R = 0 .. K - 1,
  linear between the measured R), with every trial by its number (GP for the even ones), and with
  a worker that waited past samplers.QUEUE_WAIT_S asking TPE (what the tool does).
- start: K `worker.py --trials 1` processes, each started, its imports done, waiting for one
  moment to run (so the figure is what comes after the imports); reported: from the first
  worker's ask to the last worker's first training step, the time each held the turn by sampler,
  and the near-duplicates among the K proposals (two proposals within 1e-3 in every param, in
  the unit cube: the log of a log param). `--modes nohurry` asks every trial by its number
  however long the queue; `--modes none` takes no turns (each worker samples at once).
"""

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parent.parent
SPACE = {f"model.x{i}": {"type": "float", "low": 0.0, "high": 1.0} for i in range(4)}
NEAR = 1e-3
GP_MODULES = ("torch", "scipy.optimize", "scipy.stats", "optuna._gp.gp", "optuna._gp.acqf", "optuna._gp.optim_mixed")


def value_at(params):
    return sum((params[f"model.x{i}"] - 0.2 * (i + 1)) ** 2 for i in range(4))


def write_config(folder, budget):
    (folder / "start_trainer.py").write_text(TRAINER)
    config = {
        "study": {"study_name": "start", "n_trials": budget, "trainer": "start_trainer:train"},
        "slurm": {"walltime": "10", "gpus_per_task": 0},
        "search_space": SPACE,
        "model": {f"x{i}": 0.5 for i in range(4)},
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


TRAINER = '''"""Writes when its first step came, then trains (sleeps): no trial ends while the others start."""
import json, os, time

def train(config, handle):
    step = time.time()
    handle.report(0.0, 0)
    folder = os.environ["START_BENCH_OUT"]
    with open(os.path.join(folder, f"{os.getpid()}.step"), "w") as f:
        json.dump({"step": step, "number": handle.number, "params": config["model"]}, f)
    time.sleep(float(os.environ["START_BENCH_TRAIN"]))
    return {"val_mae_mean": 0.0}
'''


def open_study(folder, seed=0):
    """The study of folder's YAML, with the sampler a worker would build."""
    sys.path.insert(0, str(PROJECT))
    from parallel_optuna import config_versions
    from parallel_optuna.study import open_storage, open_study

    config = config_versions.load(folder / "config.yaml", {}, worker=False)
    return open_study(config, open_storage(config), seed)


def build(folder, size):
    """A study of `size` finished trials with values, and its YAML adopted as a submit adopts it."""
    import optuna

    path = write_config(folder, size + 100)  # the default is GP and TPE up to 500 trials
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from parallel_optuna import config_versions as v; import sys; v.load(sys.argv[1], {}, True)",
        ]
        + [str(path)],
        cwd=PROJECT,
        check=True,
    )
    study = open_study(folder)
    space = {name: optuna.distributions.FloatDistribution(0.0, 1.0) for name in SPACE}
    rng = __import__("random").Random(size)
    trials = []
    for _ in range(size):
        params = {name: rng.random() for name in SPACE}
        trials.append(optuna.trial.create_trial(params=params, distributions=space, value=value_at(params)))
    study.add_trials(trials)
    return path


# ---------------------------------------------------------------- asks, one process
def time_asks(folder, running_counts):
    """{(sampler, R): seconds of one ask} with R trials RUNNING beside the finished ones, each ask in a fresh
    process (imports done), as a task's first ask is: its GP has no earlier fit to start from."""
    import optuna

    times = {}
    study = open_study(folder)
    space = {name: optuna.distributions.FloatDistribution(0.0, 1.0) for name in SPACE}
    rng = __import__("random").Random(1)
    running = 0
    for count in running_counts:
        while running < count:  # proposals of the workers that asked before
            params = {n: rng.random() for n in SPACE}
            state = optuna.trial.TrialState.RUNNING
            study.add_trial(optuna.trial.create_trial(params=params, distributions=space, state=state))
            running += 1
        for label in ("GP", "TPE"):
            command = [sys.executable, __file__, "--ask", str(folder), label, str(count + 7)]
            times[label, count] = float(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
    return times


def one_ask(folder, label, seed):
    """Seconds of one ask of the portfolio's GP or TPE part (printed), its imports done before."""
    import optuna

    for name in GP_MODULES:
        __import__(name)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(Path(folder), seed=int(seed))
    part = study.sampler.samplers[0 if label == "GP" else 1]
    started = time.perf_counter()
    trial = study.ask()
    frozen = trial_frozen(study, trial)
    params = part.sample_relative(study, frozen, part.infer_relative_search_space(study, frozen))
    for name in SPACE if not params else ():  # startup: independent sampling
        part.sample_independent(study, frozen, name, optuna.distributions.FloatDistribution(0.0, 1.0))
    print(time.perf_counter() - started)
    study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return 0


def trial_frozen(study, trial):
    return study._storage.get_trial(trial._trial_id)


def ask_time(times, label, r):
    """Seconds of one ask of this sampler with R trials running, linear between the measured R."""
    points = sorted((running, s) for (name, running), s in times.items() if name == label)
    below = max((p for p in points if p[0] <= r), default=points[0])
    above = min((p for p in points if p[0] >= r), default=points[-1])
    share = 0 if above[0] == below[0] else (r - below[0]) / (above[0] - below[0])
    return below[1] + share * (above[1] - below[1])


def summed(times, k, queue_wait):
    """Seconds until the last of K workers asking at one moment has its trial, and how many GP asked:
    the asks in turn, trial r by GP when r is even, unless its worker waited past queue_wait (then TPE)."""
    clock, gp_asks = 0.0, 0
    for r in range(k):
        gp = r % 2 == 0 and clock <= queue_wait
        clock += ask_time(times, "GP" if gp else "TPE", r)
        gp_asks += gp
    return clock, gp_asks


# ---------------------------------------------------------------- start, K processes
RUNNER = """
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
import contextlib, optuna, worker
from parallel_optuna import claim, samplers
for name in ("torch", "scipy.optimize", "scipy.stats", "optuna._gp.gp", "optuna._gp.acqf", "optuna._gp.optim_mixed"):
    __import__(name)  # every import before the common start
out, holds = os.environ["START_BENCH_OUT"], []
if os.environ["START_BENCH_MODE"] == "nohurry":
    samplers.QUEUE_WAIT_S = float("inf")  # every ask in turn by its number, however long the queue
original = samplers.one_ask_at_a_time
@contextlib.contextmanager
def timed_turn(folder, **kwargs):
    asked = time.time()
    with (original(folder, **kwargs) if os.environ["START_BENCH_MODE"] != "none" else contextlib.nullcontext()):
        entered = time.time()
        yield
    holds.append((asked, entered, time.time()))
samplers.one_ask_at_a_time = timed_turn
claim_trial = worker.claim_trial
def timed_claim(study, *args, **kwargs):
    asked = time.time()
    trial = claim_trial(study, *args, **kwargs)
    hurried = sorted(getattr(study.sampler, "hurried", ()))
    json.dump({"ask": asked, "holds": holds, "hurried": hurried}, open(os.path.join(out, f"{os.getpid()}.ask"), "w"))
    return trial
worker.claim_trial = timed_claim
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
sys.exit(worker.main(sys.argv[3:]))
"""


def start(folder, k, mode, workdir, project=PROJECT):
    """The timings of K workers starting at one moment, each after its imports."""
    out = workdir / f"out-{mode}-{k}"
    out.mkdir()
    moment = time.time() + 8 + 0.6 * k  # every process imported by then, on 2 cores
    env = {**os.environ, "START_BENCH_OUT": str(out), "START_BENCH_MODE": mode, "START_BENCH_TRAIN": str(k)}
    command = [sys.executable, "-c", RUNNER, str(project), str(moment), "--config", str(folder / "config.yaml")]
    workers = [
        subprocess.Popen(
            command + ["--seed_offset", str(i)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        for i in range(k)
    ]
    errors = [w.communicate()[1] for w in workers if w.wait() != 0]
    assert not errors, errors[0].decode()[-2000:]
    asks = [json.loads(p.read_text()) for p in out.glob("*.ask")]
    steps = {p.stem: json.loads(p.read_text()) for p in out.glob("*.step")}
    late = [moment - min(a["ask"] for a in asks)]
    assert late[0] <= 0.05, f"the workers were not all imported by the common moment ({late[0]:.1f} s late)"
    held = {"GP": [], "TPE": []}
    for pid, ask in ((p.stem, json.loads(p.read_text())) for p in out.glob("*.ask")):
        if pid in steps:
            number = steps[pid]["number"]
            gp = number % 2 == 0 and number not in ask["hurried"]
            held["GP" if gp else "TPE"] += [end - entered for _, entered, end in ask["holds"]]
    span = max(s["step"] for s in steps.values()) - min(a["ask"] for a in asks)
    proposals = {s["number"]: {name: s["params"][name.split(".")[1]] for name in SPACE} for s in steps.values()}
    return {"span": span, "held": held, "near": near_duplicates(proposals)}


def near_duplicates(proposals):
    """The pairs of trial numbers whose proposals are within NEAR of each other in every param."""
    return [
        (a, b)
        for (a, pa), (b, pb) in itertools.combinations(sorted(proposals.items()), 2)
        if all(abs(pa[name] - pb[name]) < NEAR for name in pa)
    ]


def samplers_queue_wait():
    sys.path.insert(0, str(PROJECT))
    from parallel_optuna import samplers

    return samplers.QUEUE_WAIT_S


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="16", help="K processes started at once, comma-separated")
    parser.add_argument("--sizes", default="0,100,400", help="finished trials in the study, comma-separated")
    parser.add_argument(
        "--modes",
        default="this,nohurry,none",
        help="this: this tree; nohurry: every ask by its number (no TPE for a queued worker); none: no turns; "
        "before: --before's tree",
    )
    parser.add_argument(
        "--before", type=Path, help="another copy of the tool (git archive <commit>), for --modes before"
    )
    parser.add_argument("--running", default="0,32,128,255", help="R for the asks")
    args = parser.parse_args()
    ks, sizes, modes = [int(k) for k in args.workers.split(",")], [int(n) for n in args.sizes.split(",")], args.modes
    print(f"load: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            folder = Path(tmp) / f"study{size}"
            folder.mkdir()
            build(folder, size)
            scratch = Path(tmp) / f"asks{size}"  # the asks leave RUNNING trials behind
            subprocess.run(["cp", "-r", str(folder), str(scratch)], check=True)
            times = time_asks(scratch, [int(r) for r in args.running.split(",")])
            print(f"\nstudy of {size} finished trials")
            for label in ("GP", "TPE"):
                shown = ", ".join(f"R={r}: {s:.3f} s" for (name, r), s in sorted(times.items()) if name == label)
                print(f"  one ask, {label:3}: {shown}")
            for k in (64, 256):
                turns, gp_turns = summed(times, k, float("inf"))
                hurry, gp_hurry = summed(times, k, samplers_queue_wait())
                print(
                    f"  K={k} asks in turn (summed): by number {turns:.1f} s ({gp_turns} GP); "
                    f"past a {samplers_queue_wait():.0f} s wait TPE {hurry:.1f} s ({gp_hurry} GP)"
                )
            for k in ks:
                for mode in modes.split(","):
                    workdir = Path(tmp) / f"run{size}"
                    workdir.mkdir(exist_ok=True)
                    copy = workdir / f"{mode}{k}"
                    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
                    project = args.before if mode == "before" else PROJECT
                    found = start(copy, k, mode, workdir, project)
                    held = "  ".join(
                        f"{name} {statistics.median(s):.3f} s (max {max(s):.3f})"
                        for name, s in found["held"].items()
                        if s
                    )
                    print(
                        f"  K={k:<3} {mode:5} first ask -> last first step {found['span']:6.2f} s   "
                        f"near-duplicates {len(found['near']):3d} {found['near'] or ''}  "
                        f"turn held: {held or 'no turn taken'}"
                    )
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(one_ask(*sys.argv[2:]) if sys.argv[1:2] == ["--ask"] else main())
