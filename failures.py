"""Trials that fail in the trainer, and when array tasks stop starting more of them.

A trainer that fails the same way for every config (a metric it does not return, a typo in its
code, a param of the wrong type) would fail once in every task of an array, each task after
loading its data, and on a GPU cluster each after waiting in the queue. Once the study's last
STREAK finished trials all failed in the trainer with one reason, none COMPLETE or PRUNED after
them, array tasks start no new trial. Fixing it resets the count: a submit, or an edit of the
YAML or of the trainer's file, after those failures.
"""

import os
import re
import time

import optuna

import study_control

STREAK = 3
# Failures that are not the trainer's: a dead worker, a repeat or surplus dropped, a stop on purpose.
NOT_THE_TRAINERS = ("worker died", "surplus", "duplicate", "walltime reached", *study_control.STOPPED_REASONS)
FAIL = optuna.trial.TrialState.FAIL
ENDED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, FAIL)


def in_the_trainer(trial):
    """A FAIL trial whose trainer (or objective) raised, or returned no usable metric."""
    return trial.state == FAIL and not trial.user_attrs.get("fail_reason", "worker died").startswith(NOT_THE_TRAINERS)


def shape(reason):
    """A failure's reason without its numbers: 'nan at step 3' and 'nan at step 5' are one reason."""
    return re.sub(r"\d+(\.\d+)?", "N", reason.splitlines()[0] if reason else "")


def broken_streak(trials, since=0.0):
    """The trainer's last failures if they stop new trials (STREAK or more in a row, one reason, after `since`)."""
    finished = sorted(
        (t for t in trials if t.state in ENDED and t.datetime_complete and t.datetime_complete.timestamp() > since),
        key=lambda t: t.datetime_complete,
    )
    streak = []
    for trial in reversed(finished):
        if trial.state != FAIL:
            break
        if in_the_trainer(trial):  # a dead worker's or a cancelled trial neither ends the streak nor adds to it
            streak.append(trial)
    reasons = {shape(t.user_attrs["fail_reason"]) for t in streak}
    return streak if len(streak) >= STREAK and len(reasons) == 1 else []


def fixed_since(study, config, code_file=None):
    """When the user last acted on a failure: the last submit, or the last edit of the YAML or the trainer."""
    times = [
        time.mktime(time.strptime(j["submitted_at"], "%Y-%m-%dT%H:%M:%S"))
        for j in study.user_attrs.get("array_jobs", [])
        if j.get("submitted_at")
    ]
    for path in (config.path, code_file):
        try:
            times.append(os.path.getmtime(path))
        except (OSError, TypeError):
            pass
    return max(times, default=0.0)


def describe(streak):
    first = streak[0].user_attrs["fail_reason"].splitlines()[0]
    return f"the last {len(streak)} trials all failed in the trainer with ({first[:200]})"
