"""Plain Optuna objectives for the tests, copied into an experiment's folder as objectives.py.

`steady` polls trial_control at each step (a save point); `oblivious` never does, so a walltime
interrupts it and it runs again, with the same params, after the requeue. Both take STEP_S per step.
"""

import json
import time
from pathlib import Path

import optuna

from parallel_optuna import trial_control

STEPS, STEP_S = 30, 1.5


def steady(trial):
    x = trial.suggest_float("x", -2, 2)
    state_file = trial_control.trial_dir(trial) / "state.json"
    start = json.loads(state_file.read_text())["step"] if state_file.exists() else 0
    for step in range(start, STEPS):
        time.sleep(STEP_S)
        trial.report(x * x + 1 / (step + 1), step)
        if trial_control.stop_requested():
            state_file.write_text(json.dumps({"step": step + 1}))
            raise trial_control.Stop()
    return x * x


def oblivious(trial):
    """Never asks to stop; its first run outlasts any walltime signal, a rerun is short."""
    x = trial.suggest_float("x", -2, 2)
    runs = trial.user_attrs.get("runs", 0) + 1
    trial.set_user_attr("runs", runs)
    for step in range(STEPS if runs == 1 else 2):
        time.sleep(STEP_S)
        trial.report(x * x + 1 / (step + 1), step)
    return x * x


def mixed(trial):
    return steady(trial) if trial.number % 2 == 0 else oblivious(trial)


def quick(trial):
    """A plain objective with pruning and the user's own attributes."""
    x, kind = trial.suggest_float("x", -2, 2), trial.suggest_categorical("kind", ["a", "b"])
    trial.set_user_attr("note", f"kind {kind}")
    for step in range(3):
        trial.report(x * x + step, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return x * x + (0.5 if kind == "b" else 0.0)


def steals_host(trial):
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("host", "elsewhere")
    return 0.0


def two(trial):
    """Two objectives: the Pareto front is x in [0, 1]."""
    x = trial.suggest_float("x", -2, 3)
    return x * x, (x - 1) ** 2


def coin(trial):
    """Two configs only: a plain objective cannot help repeating one."""
    return 1.0 if trial.suggest_categorical("side", ["heads", "tails"]) == "heads" else 0.0


def resumes_like_optuna_examples(trial):
    """Resumes the way optuna-examples' pytorch/pytorch_checkpoint.py does: from the folder of the trial
    that RetryHeartbeatStaleTrialCallback names as the one retried, asked with the stored trial."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    x = trial.suggest_float("x", -2, 2)
    retried = RetryHeartbeatStaleTrialCallback.retried_trial_number(trial.study.trials[trial.number])
    folder = Path(__file__).with_name("checkpoints") / str(trial.number if retried is None else retried)
    checkpoint = folder / "model.json"
    first = json.loads(checkpoint.read_text())["epoch"] if retried is not None and checkpoint.exists() else 0
    trial.set_user_attr("first_epoch", first)
    folder.mkdir(parents=True, exist_ok=True)
    for epoch in range(first, 12):
        time.sleep(0.5)
        trial.report(x * x + 1 / (epoch + 1), epoch)
        checkpoint.write_text(json.dumps({"epoch": epoch + 1}))
    return x * x


def silent(trial):
    """Suggests once, then computes for a minute without a call to Optuna: no safe point to stop at."""
    x = trial.suggest_float("x", -2, 2)
    deadline = time.time() + 60
    while time.time() < deadline:
        sum(i * i for i in range(10_000))
    return x * x
