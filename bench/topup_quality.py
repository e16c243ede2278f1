"""What a big start's proposals are worth: K workers asking at once on a study of N finished trials.

    python bench/topup_quality.py --problem hartmann6 --size 100 --k 64 --seeds 10

A top-up (or the second day of a study) starts K tasks together on a study the default sampler has
modelled. They ask in turn, each seeing the proposals before it as RUNNING. Compared, on the same N
finished trials per seed:

- number: every trial by its number, GP for the even ones (what a worker does without a queue);
- hurry: the first trial by GP, the other K - 1 by TPE (a queued worker asks TPE: samplers.QUEUE_WAIT_S;
  at hundreds of trials one GP ask outlasts the wait, so a big start is about this);
- random: K random proposals, for scale.

Reported per mode: the median regret of the best of the K proposals (their noiseless values, against
the problem's optimum), of the best of the study before them and after them, the time the K asks took
in one process, and the near-duplicates among the proposals (within 1e-3 in every param of the unit cube).
"""

import argparse
import contextlib
import itertools
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import problems  # noqa: E402
from bench.screen import PROBLEMS, claim, value  # noqa: E402
from parallel_optuna import samplers  # noqa: E402
from parallel_optuna.config import Config  # noqa: E402

NEAR = 1e-3
MODES = ("number", "hurry", "random")


def history(problem, size, seed, config):
    """A study of `size` trials run by the default sampler, one worker, as the start's common ground."""
    study = optuna.create_study(sampler=samplers.portfolio(seed))
    for _ in range(size):
        trial = claim(study, config)
        true = value(problem, trial.params)
        trial.set_user_attr("true_value", true)
        study.tell(trial, true)
    return study


def batch(study, problem, mode, k, seed, config):
    """K proposals asked in turn on a copy of the study: (their noiseless values, their params, seconds)."""
    copy = optuna.create_study(sampler=samplers.portfolio(seed + 1))
    copy.add_trials(study.get_trials(deepcopy=False))
    if mode == "random":
        copy.sampler = optuna.samplers.RandomSampler(seed=seed)
    started, proposed = time.perf_counter(), []
    for position in range(k):
        hurry = mode == "hurry" and position > 0  # as a worker that queued for its turn
        with samplers.in_a_hurry(copy.sampler, waited=3.0) if hurry else contextlib.nullcontext():
            proposed.append(claim(copy, config))  # left RUNNING: the next ask plans around it
    seconds = time.perf_counter() - started
    return [value(problem, t.params) for t in proposed], [t.params for t in proposed], seconds


def near_duplicates(params, space):
    unit = [{name: unit_value(p[name], space[name]) for name in space} for p in params]
    return sum(all(abs(a[n] - b[n]) < NEAR for n in space) for a, b in itertools.combinations(unit, 2))


def unit_value(x, spec):
    if spec["type"] == "categorical":
        return float(spec["choices"].index(x))
    low, high = spec["low"], spec["high"]
    if spec.get("log"):
        return (math.log(x) - math.log(low)) / (math.log(high) - math.log(low))
    return (x - low) / (high - low)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="hartmann6", choices=["hartmann6", "mixed"])
    parser.add_argument("--size", type=int, default=100, help="finished trials before the start")
    parser.add_argument("--k", type=int, default=64, help="workers starting together")
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    spec = PROBLEMS[args.problem]
    config = Config(
        {
            "study": {"allow_repeats": False, "n_trials": args.size + args.k, "objective": None},
            "search_space": spec["space"],
        },
        "-",
    )
    optimum = problems.OPTIMUM[args.problem]
    rows = {mode: {"best": [], "seconds": [], "near": []} for mode in MODES}
    before = []
    for seed in range(args.seeds):
        study = history(args.problem, args.size, seed, config)
        before.append(study.best_value - optimum)
        for mode in MODES:
            values, params, seconds = batch(study, args.problem, mode, args.k, 1000 + seed, config)
            rows[mode]["best"].append(min(values) - optimum)
            rows[mode]["seconds"].append(seconds)
            rows[mode]["near"].append(near_duplicates(params, spec["space"]))
        print(f"seed {seed}: before {before[-1]:.4f} " + " ".join(f"{m} {rows[m]['best'][-1]:.4f}" for m in MODES))
    print(f"\n{args.problem}, {args.size} finished trials, K = {args.k}, {args.seeds} seeds (median regret)")
    print(f"  before the start: {statistics.median(before):.4f}")
    for mode, row in rows.items():
        print(
            f"  {mode:7} best of the K: {statistics.median(row['best']):.4f}   "
            f"best after: {statistics.median(min(a, b) for a, b in zip(before, row['best'], strict=True)):.4f}   "
            f"K asks {statistics.median(row['seconds']):6.1f} s   near-duplicates {sum(row['near'])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
