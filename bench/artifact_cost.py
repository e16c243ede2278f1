"""What registering the trials' files as Optuna artifacts costs: journal bytes, nothing else.

    python bench/artifact_cost.py                 # 4 trials, 2 local workers
    python bench/artifact_cost.py --trials 8 --workers 4

Runs config.example.yaml's experiment, shrunk to run on CPUs in about a minute (fewer samples,
epochs and folds; no GPU), with `submit_study.py --local`, in a temporary folder. Measured: the
journal lines that register an artifact (Optuna's `artifacts:` attributes), their bytes per
registered file, and their share of the whole journal.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import optuna
import yaml

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from parallel_optuna.config import load_config  # noqa: E402
from parallel_optuna.study import open_storage  # noqa: E402

SHRUNK = {"data": {"n_samples": 192}, "training": {"epochs": 2, "k_folds": 2, "device": "cpu"}}


def write_experiment(folder: Path, trials: int) -> Path:
    config = yaml.safe_load((PROJECT / "config.example.yaml").read_text())
    config["study"].update({"study_name": "artifact_cost", "n_trials": trials, "storage": None})
    config["slurm"]["gpus_per_task"] = 0
    for section, values in SHRUNK.items():
        config[section].update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        path = write_experiment(Path(folder), args.trials)
        command = [sys.executable, "submit_study.py", "--config", str(path), "--local", str(args.workers)]
        done = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"the study failed:\n{done.stdout}{done.stderr}")
        journal = (Path(folder) / "runs/artifact_cost/journal.log").read_bytes().splitlines(keepends=True)
        registered = [line for line in journal if b'"artifacts:' in line]
        total, spent = sum(map(len, journal)), sum(map(len, registered))
        study = optuna.load_study(study_name="artifact_cost", storage=open_storage(load_config(path), reading=True))
        states = [t.state.name for t in study.trials]
    counts = ", ".join(f"{states.count(state)} {state}" for state in sorted(set(states)))
    print(f"{len(states)} trials ({counts}), {len(registered)} files registered")
    print(f"journal {total} bytes, of which artifacts {spent} bytes ({spent / total:.0%})")
    if registered:
        print(f"{spent / len(registered):.0f} bytes per registered file")


if __name__ == "__main__":
    main()
