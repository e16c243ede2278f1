"""Sampler quality with K workers: is the default as good in parallel as sequential TPE?

    python bench/quality.py --quick          # make bench: a smoke run of every problem, ~3 minutes on 2 cores
    python bench/quality.py                  # full: 4 problems x K in 1,4,8 x 5 seeds, 60 trials each

Every study runs through the real worker path against a journal file, as a user's would:
  local  submit_study.py --local K: K `worker.py --trials 0` processes
  array  K concurrent `worker.py --trials 1` processes, a new one launched as each exits
         (what a SLURM array with %K does, without SLURM)
Problems (bench/problems.py, plus the example LSTM): Hartmann-6, a noisy Styblinski-Tang, a mixed
int/categorical/log-float space, and a short real training. Each trial sleeps `--sleep` seconds so
that K trials overlap. Printed per setting: median and worst regret over the seeds (best value
for the LSTM, whose optimum is unknown), repeats the sampler proposed (answered or asked again),
configs trained twice, and the median wall time. Each study is added to
bench/results/quality-<time>.json as it ends (--summarize prints its tables).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

BENCH = Path(__file__).resolve().parent
PROJECT = BENCH.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(BENCH))
from problems import OPTIMUM  # noqa: E402

from parallel_optuna.config import load_config
from parallel_optuna.study import open_storage, still_to_run

FLOAT = {"type": "float", "low": 0.0, "high": 1.0}
PROBLEMS = {
    "hartmann6": {"space": {f"x.x{i}": FLOAT for i in range(6)}},
    "noisy_st4": {
        "space": {f"x.x{i}": {"type": "float", "low": -5.0, "high": 5.0} for i in range(4)},
        "trainer": "styblinski_tang",
        "noise": 3.0,
    },
    "mixed": {
        "space": {
            "x.lr": {"type": "float", "low": 1.0e-5, "high": 1.0e-1, "log": True},
            "x.d_pos": {"type": "int", "low": 2, "high": 16, "step": 2},
            "x.d_hidden": {"type": "categorical", "choices": [16, 32, 64, 128]},
            "x.n_layers": {"type": "int", "low": 1, "high": 4},
            "x.dropout": {"type": "float", "low": 0.0, "high": 0.5},
            "x.batch_size": {"type": "categorical", "choices": [32, 64, 128, 256]},
        }
    },
    "lstm": {
        "space": {
            "model.d_pos": {"type": "int", "low": 2, "high": 16, "step": 2},
            "model.d_hidden": {"type": "categorical", "choices": [8, 16, 32]},
            "training.lr": {"type": "float", "low": 1.0e-4, "high": 3.0e-2, "log": True},
        }
    },
}
SAMPLERS = {"default": {}, "tpe": {"name": "TPESampler"}}  # default: a YAML without a sampler name


def experiment(folder, problem, sampler, seed, args):
    """An experiment YAML for one study of the benchmark."""
    spec = PROBLEMS[problem]
    study = {
        "study_name": "q",
        "n_trials": args.trials_lstm if problem == "lstm" else args.trials,
        "sampler": {**SAMPLERS[sampler], "seed": seed},
        "pruner": {"name": "NopPruner"},
    }
    config = {"study": study, "slurm": {"gpus_per_task": 0}}
    if problem == "lstm":
        study.update(trainer="examples.ishigami_lstm:train", optimization_metric="val_mae_mean")
        config["data"] = {"dir": str(Path(args.workdir) / "ishigami_data"), "n_samples": 192, "seed": 0}
        config["model"] = {"d_pos": 4, "d_hidden": 16, "n_layers": 1, "d_in": None, "d_head": None}
        config["training"] = {"epochs": 2, "batch_size": 64, "lr": 0.003, "k_folds": 2, "device": "cpu", "seed": 0}
    else:
        study.update(trainer=f"bench.problems:train_{spec.get('trainer', problem)}", optimization_metric="value")
        config["bench"] = {"sleep": args.sleep, "noise": spec.get("noise", 0.0)}
        config["x"] = {key.split(".")[1]: None for key in spec["space"]}
    config["search_space"] = spec["space"]
    path = Path(folder) / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def python(script, *args):
    return [sys.executable, str(PROJECT / script), *map(str, args)]


def run_local(path, k):
    subprocess.run(python("submit_study.py", "--config", path, "--local", k), env=ENV, capture_output=True, check=True)


def run_array(path, k):
    """K concurrent one-trial workers, a new one launched as each exits, until the budget is covered."""
    subprocess.run(python("submit_study.py", "--config", path, "--no-submit_jobs"), env=ENV, capture_output=True)
    config = load_config(path)
    study = optuna.load_study(study_name="q", storage=open_storage(config))
    alive, launched, covered = [], 0, False
    while alive or not covered:
        alive = [p for p in alive if p.poll() is None]
        covered = still_to_run(study.get_trials(deepcopy=False), config["study"]["n_trials"]) == 0
        if not covered and len(alive) < k:
            command = python("worker.py", "--config", path, "--trials", 1, "--seed_offset", launched)
            alive.append(subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            launched += 1
        else:
            time.sleep(0.05)


def measure(problem, sampler, k, seed, mode, args):
    with tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        path = experiment(folder, problem, sampler, seed, args)
        started = time.time()
        (run_local if mode == "local" else run_array)(path, k)
        wall = time.time() - started
        study = optuna.load_study(study_name="q", storage=open_storage(load_config(path)))
        trials = study.get_trials(deepcopy=False)
        best = study.best_trial
    trained = [tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE"]
    trained = [
        p
        for t, p in zip([t for t in trials if t.state.name == "COMPLETE"], trained, strict=True)
        if "duplicate_of" not in t.user_attrs
    ]
    repeats = sum(
        "duplicate_of" in t.user_attrs or "duplicate of" in t.user_attrs.get("fail_reason", "") for t in trials
    )
    true = best.user_attrs.get("metrics", {}).get("true_value", best.value)
    return {
        "problem": problem,
        "sampler": sampler,
        "k": k,
        "mode": mode,
        "seed": seed,
        "score": true - OPTIMUM.get(PROBLEMS[problem].get("trainer", problem), 0.0),
        "repeats": repeats,
        "trained_twice": len(trained) - len(set(trained)),
        "wall_s": round(wall, 1),
    }


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT)}  # one core per worker, as one GPU


def settings(args):
    """(sampler, K, mode): sequential TPE is the reference, then the default at the largest K first."""
    yield "tpe", 1, "local"
    for k in sorted(args.ks, reverse=True):
        yield "default", k, "local"
    if "array" in args.modes and max(args.ks) > 1:
        yield "default", max(args.ks), "array"


def spread(scores, draws=2000):
    """A 90% bootstrap interval of the median, and how often 5 studies meet "worst <= 2x median".

    The targets are read on 5 studies, whose median moves by 1.5x between draws of seeds on a
    multimodal problem: with more seeds these two say whether a difference is one.
    """
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(scores, k=len(scores))) for _ in range(draws))
    fives = [rng.choices(scores, k=5) for _ in range(draws)]
    robust = sum(max(five) <= 2 * statistics.median(five) for five in fives) / draws
    return medians[draws // 20], medians[-draws // 20], robust


def summarize(rows, problem):
    """One line per setting: median (and its interval), worst, repeats, trained twice, wall; then the targets."""
    print(f"\n{problem}: {'regret' if problem != 'lstm' else 'best val_mae_mean'} (lower is better)")
    print(
        f"  {'sampler':<9}{'K':>3} {'mode':<6}{'median':>9}{'90% interval':>19}{'worst':>9}{'vs TPE K=1':>12}"
        f"{'P(worst5<=2x)':>15}{'repeats':>9}{'trained 2x':>11}{'wall s':>8}"
    )
    groups = {}
    for r in rows:
        groups.setdefault((r["sampler"], r["k"], r["mode"]), []).append(r)
    reference = statistics.median(r["score"] for r in groups.get(("tpe", 1, "local"), [{"score": float("nan")}]))
    for (sampler, k, mode), group in groups.items():
        scores = sorted(r["score"] for r in group)
        median = statistics.median(scores)
        low, high, robust = spread(scores)
        ratio = median / reference if reference else float("nan")
        print(
            f"  {sampler:<9}{k:>3} {mode:<6}{median:>9.4f}{f'{low:.4f} - {high:.4f}':>19}{scores[-1]:>9.4f}"
            f"{ratio:>11.2f}x{robust:>15.2f}{sum(r['repeats'] for r in group):>9}"
            f"{sum(r['trained_twice'] for r in group):>11}{statistics.median(r['wall_s'] for r in group):>8.1f}"
        )
        if sampler == "default" and k == max(k for _, k, _ in groups) and k > 1:
            ok = median <= reference and scores[-1] <= 2 * median
            print(f"    target (median <= TPE K=1 median, worst <= 2x median): {'met' if ok else 'NOT met'}")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="make bench: a smoke run, TPE K=1 vs the default K=8, 1 seed, 20 trials"
    )
    parser.add_argument(
        "--problems", default="hartmann6,lstm,mixed,noisy_st4", help="comma-separated: " + ",".join(PROBLEMS)
    )
    parser.add_argument("--ks", default="1,4,8", help="worker counts")
    parser.add_argument("--modes", default="local,array", help="local (--local K) and/or array (one trial per process)")
    parser.add_argument("--seeds", type=int, default=5, help="studies per setting, sampler seeds 0..n-1")
    parser.add_argument("--trials", type=int, default=60, help="trials per study (synthetic problems)")
    parser.add_argument("--trials_lstm", type=int, default=60, help="trials per study of the LSTM")
    parser.add_argument("--sleep", type=float, default=0.5, help="seconds per trial, so that K trials overlap")
    parser.add_argument("--workdir", default=None, help="where the studies run (default: a temporary folder)")
    parser.add_argument("--summarize", metavar="JSON", help="print the tables of an earlier (or interrupted) run")
    args = parser.parse_args()
    if args.quick:
        args.ks, args.seeds, args.trials, args.trials_lstm, args.sleep = "8", 1, 20, 10, 0.2
        args.modes = "local"
    args.ks = [int(k) for k in args.ks.split(",")]
    args.modes = args.modes.split(",")
    return args


def main():
    args = parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if args.summarize:
        rows = json.loads(Path(args.summarize).read_text())["rows"]
        for problem in dict.fromkeys(r["problem"] for r in rows):
            summarize([r for r in rows if r["problem"] == problem], problem)
        return
    rows = []
    out = BENCH / "results" / f"quality-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    used = {k: v for k, v in vars(args).items() if k != "workdir"}
    with tempfile.TemporaryDirectory() as scratch:
        args.workdir = args.workdir or scratch
        for problem in args.problems.split(","):
            started = time.time()
            for seed in range(args.seeds):  # seeds outermost: an interrupted run still compares like with like
                for sampler, k, mode in settings(args):
                    rows.append(measure(problem, sampler, k, seed, mode, args))
                    out.write_text(json.dumps({"args": used, "optuna": optuna.__version__, "rows": rows}, indent=1))
            summarize([r for r in rows if r["problem"] == problem], problem)
            print(f"  ({time.time() - started:.0f} s)", flush=True)
    print(f"\nwritten: {out} (python bench/quality.py --summarize {out})")


if __name__ == "__main__":
    main()
