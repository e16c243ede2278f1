"""Screen sampler candidates fast: K workers in one process on a simulated clock.

    python bench/screen.py --problem hartmann6 --candidates tpe,gp --ks 1,8
    python bench/screen.py --problem noisy_st4 --candidates tpe,tpe_nocl --seeds 15

Each of K workers has its own sampler (seed offset per worker, as worker.py gives it) on one shared
in-memory study; every trial takes 0.7-1.3 time units, so K trials overlap and each ask sees the
others RUNNING, as on K GPUs. Repeats are settled by repeats.py, as in the worker. No process start,
no storage, no sleeping: a candidate costs only its sampler's time. quality.py confirms a choice
through the real worker path.
"""

import argparse
import heapq
import random
import statistics
import sys
import time
import warnings
from pathlib import Path

import optuna

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import problems  # noqa: E402
from bench.quality import PROBLEMS, spread  # noqa: E402
from parallel_optuna import (
    repeats,  # noqa: E402
    samplers,  # noqa: E402
)
from parallel_optuna.config import Config

S = optuna.samplers


CANDIDATES = {
    "tpe": lambda seed, k, n: S.TPESampler(seed=seed),  # optuna 5: multivariate, constant_liar
    "tpe_nocl": lambda seed, k, n: S.TPESampler(seed=seed, constant_liar=False),
    "tpe_indep": lambda seed, k, n: S.TPESampler(seed=seed, multivariate=False, constant_liar=False),
    "tpe_startK": lambda seed, k, n: S.TPESampler(seed=seed, n_startup_trials=max(10, 2 * k)),
    "tpe_group": lambda seed, k, n: S.TPESampler(seed=seed, group=True, n_startup_trials=max(10, 2 * k)),
    "gp": lambda seed, k, n: S.GPSampler(seed=seed),
    "gp_startK": lambda seed, k, n: S.GPSampler(seed=seed, n_startup_trials=max(10, 2 * k)),
    "random": lambda seed, k, n: S.RandomSampler(seed=seed),
    # a portfolio: even workers GP, odd workers TPE, all on the same study (K=1: GP alone)
    "gp_tpe": lambda seed, k, n: S.GPSampler(seed=seed) if seed % 2 == 0 else S.TPESampler(seed=seed),
    # the default for small spaces (samplers.portfolio): even trials GP, odd trials TPE, in every worker
    "portfolio": lambda seed, k, n: samplers.portfolio(seed),
    # the default with TPE's random startup scaled with K, as tpe_startK
    "portfolio_startK": lambda seed, k, n: samplers.ByTrial(
        S.GPSampler(seed=2 * seed), S.TPESampler(seed=2 * seed + 1, n_startup_trials=max(10, 2 * k))
    ),
    # TPE-heavier: trials 0, 3, 6, ... GP, the others TPE
    "portfolio_tpe2": lambda seed, k, n: samplers.ByTrial(
        S.GPSampler(seed=3 * seed), S.TPESampler(seed=3 * seed + 1), S.TPESampler(seed=3 * seed + 2)
    ),
    # the default with both samplers' random startup scaled to the budget: a quarter of it, 4 to 10 trials
    "portfolio_short": lambda seed, k, n: samplers.ByTrial(
        S.GPSampler(seed=2 * seed, n_startup_trials=min(10, max(4, n // 4))),
        S.TPESampler(seed=2 * seed + 1, n_startup_trials=min(10, max(4, n // 4))),
    ),
    # a shared scrambled Sobol sequence for the first trials (one seed for all workers), then the default
    "sobol10_portfolio": lambda seed, k, n: sobol_then(10, seed, samplers.portfolio(seed)),
    "sobol16_portfolio": lambda seed, k, n: sobol_then(16, seed, samplers.portfolio(seed)),
    "sobol10_quick": lambda seed, k, n: sobol_then(
        10, seed, samplers.ByTrial(S.GPSampler(seed=2 * seed, n_startup_trials=2), S.TPESampler(seed=2 * seed + 1))
    ),
    "sobol10_tpe": lambda seed, k, n: sobol_then(10, seed, S.TPESampler(seed=seed)),
}


class Startup(samplers.ByTrial):
    """Trials numbered below n sampled by first, the rest by then."""

    def __init__(self, n, first, then):
        super().__init__(first, then)
        self.n = n

    def _of(self, trial):
        return self.samplers[0] if trial.number < self.n else self.samplers[1]


def sobol_then(n, seed, then):
    shared = seed // 1000  # one sequence for all workers of a study
    return Startup(n, S.QMCSampler(scramble=True, seed=shared, warn_independent_sampling=False), then)


def value(problem, params):
    x = {key.split(".")[1]: v for key, v in params.items()}
    if problem == "hartmann6":
        return problems.hartmann6([x[f"x{i}"] for i in range(6)])
    if problem == "noisy_st4":
        return problems.styblinski_tang([x[f"x{i}"] for i in range(4)])
    return problems.mixed(x)


def claim(study, config):
    while True:
        trial = study.ask()
        if not repeats.settle(study, trial, config):
            return trial
        if sum(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) >= config["study"]["n_trials"]:
            return None


def run(problem, candidate, k, seed, n_trials, noise=None):
    """One study: regret of the best trial (its noiseless value) and the repeats settled."""
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="s")
    make = CANDIDATES[candidate]
    workers = [
        optuna.load_study(study_name="s", storage=storage, sampler=make(seed * 1000 + i, k, n_trials)) for i in range(k)
    ]
    spec = PROBLEMS[problem]
    config = Config(
        {"study": {"allow_repeats": False, "n_trials": n_trials, "objective": None}, "search_space": spec["space"]}, "-"
    )
    sd = spec.get("noise", 0.0) if noise is None else noise
    rng, events = random.Random(seed), []
    for w in range(k):
        heapq.heappush(events, (rng.uniform(0.7, 1.3), w, claim(workers[w], config)))
    while events:
        clock, w, trial = heapq.heappop(events)
        true = value(problem, trial.params)
        trial.set_user_attr("true_value", true)
        workers[w].tell(trial, true + (rng.gauss(0, sd) if sd else 0.0))
        done = sum(t.state.name == "COMPLETE" for t in workers[w].get_trials(deepcopy=False))
        following = claim(workers[w], config) if done + len(events) < n_trials else None
        if following is not None:
            heapq.heappush(events, (clock + rng.uniform(0.7, 1.3), w, following))
    trials = workers[0].get_trials(deepcopy=False)
    best = workers[0].best_trial
    optimum = problems.OPTIMUM[spec.get("trainer", problem)]
    settled = sum(
        "duplicate_of" in t.user_attrs or "duplicate of" in t.user_attrs.get("fail_reason", "") for t in trials
    )
    return best.user_attrs.get("true_value", best.value) - optimum, settled


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problem", default="hartmann6", choices=["hartmann6", "noisy_st4", "mixed"])
    parser.add_argument("--candidates", default="tpe,gp", help="comma-separated: " + ",".join(CANDIDATES))
    parser.add_argument("--ks", default="1,8")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--noise", type=float, help="the sd of the noise added to each value (default: the problem's)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore")
    print(
        f"{'problem':<11}{'candidate':<12}{'K':>3}{'median':>9}{'90% interval':>17}{'worst':>9}"
        f"{'P(worst5<=2x)':>15}{'repeats':>9}{'s':>6}  regrets"
    )
    for candidate in args.candidates.split(","):
        for k in map(int, args.ks.split(",")):
            started = time.time()
            results = [run(args.problem, candidate, k, seed, args.trials, args.noise) for seed in range(args.seeds)]
            regrets = sorted(r[0] for r in results)
            low, high, robust = spread(regrets)
            print(
                f"{args.problem:<11}{candidate:<12}{k:>3}{statistics.median(regrets):>9.3f}"
                f"{f'{low:.3f} - {high:.3f}':>17}{regrets[-1]:>9.3f}{robust:>15.2f}"
                f"{sum(r[1] for r in results):>9}{time.time() - started:>6.0f}  {[round(r, 3) for r in regrets]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
