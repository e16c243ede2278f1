"""Trials that fail in the trainer, and when array tasks stop starting more of them.

A trainer that fails the same way for every config (a metric it does not return, a typo in its
code, a param of the wrong type) would fail once in every task of an array, each task after
loading its data, and on a GPU cluster each after waiting in the queue. Once STREAK trials have
failed in the trainer since the user last acted (a submit, an edit of the YAML or of the
trainer's file), none COMPLETE or PRUNED in that time and the last STREAK with one reason, array
tasks start no new trial. Acting again lets them start.
"""

import os
import re
import sys
import time
from pathlib import Path

import optuna

from parallel_optuna import attributes as attr
from parallel_optuna import study_control
from parallel_optuna.user_code import code_key

STREAK = 3
# Failures that are not the trainer's: a dead worker, a repeat or surplus dropped, a stop on purpose.
NOT_THE_TRAINERS = ("worker died", "surplus", "duplicate", "walltime reached", *study_control.STOPPED_REASONS)
FAIL = optuna.trial.TrialState.FAIL
RESET = attr.FAILURES_RESET_AT
ENDED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, FAIL)


def in_the_trainer(trial):
    """A FAIL trial whose trainer (or objective) raised, or returned no usable metric."""
    return trial.state == FAIL and not trial.user_attrs.get(attr.FAIL_REASON, "worker died").startswith(
        NOT_THE_TRAINERS
    )


def shape(reason):
    """A failure's reason without its numbers: 'nan at step 3' and 'nan at step 5' are one reason."""
    return re.sub(r"\d+(\.\d+)?", "N", reason.splitlines()[0] if reason else "")


def broken_streak(trials, since=0.0):
    """The trainer's failures that stop new trials, else [].

    Since `since`: at least STREAK failures in the trainer, no trial COMPLETE or PRUNED (a trainer
    that works for some configs is never stopped: a failure is then the config's), and the last
    STREAK with one reason.
    """
    ended = sorted(
        (t for t in trials if t.state in ENDED and t.datetime_complete and t.datetime_complete.timestamp() > since),
        key=lambda t: t.datetime_complete,
    )
    if any(t.state != FAIL for t in ended):
        return []
    failed = [t for t in ended if in_the_trainer(t)]  # a dead worker's or a cancelled trial is not the trainer's
    one_reason = len({shape(t.user_attrs[attr.FAIL_REASON]) for t in failed[-STREAK:]}) == 1
    return failed if len(failed) >= STREAK and one_reason else []


def stopping(study, config, trials=None):
    """broken_streak() of the study since the user last acted: what keeps array tasks from starting trials."""
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    return broken_streak(trials, fixed_since(study, config))


def fixed_since(study, config):
    """When the user last acted on failures: a submit, or an edit of the YAML or of the trainer's file."""
    stamps = [j.get("submitted_at") for j in study.user_attrs.get(attr.ARRAY_JOBS, [])]
    stamps.append(study.user_attrs.get(RESET))
    times = [time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) for stamp in stamps if stamp]
    for path in (config.path, code_file(config)):
        try:
            times.append(os.path.getmtime(path))
        except (OSError, TypeError):
            pass
    return max(times, default=0.0)


def code_file(config):
    """The file of the trainer's (or objective's) module, found as the worker finds it, without importing it."""
    module = Path(*config["study"][code_key(config)].partition(":")[0].split("."))
    for folder in (os.getcwd(), config.dir, *sys.path):
        for candidate in (Path(folder) / module.with_suffix(".py"), Path(folder) / module / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def describe(streak):
    last = streak[-1].user_attrs[attr.FAIL_REASON].splitlines()[0][:200]
    return f"the {len(streak)} trials since the last submit or edit all failed in the trainer, the last with ({last})"


def fail_in_trainer(study, trial, reason):
    """The trial fails as the trainer's, with its reason."""
    trial.set_user_attr(attr.FAIL_REASON, reason[:500])
    study.tell(trial, state=FAIL)
