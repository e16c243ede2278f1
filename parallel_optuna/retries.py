"""Retries, linked the way Optuna links them, so that Optuna's own helpers and an objective written after
optuna-examples' pytorch_checkpoint.py see every retry the tool makes.

A retry is a WAITING trial with the same params (as `enqueue_trial` makes one) that carries what
`optuna.storages.RetryHeartbeatStaleTrialCallback` computes, in system attributes:
    failed_trial    the first trial of the chain (`RetryHeartbeatStaleTrialCallback.retried_trial_number`)
    retry_history   the chain oldest first, the trial it replaces last (`...retry_history`)
and, in user attributes, `retry_of` (the trial it replaces: retry_history[-1]) and `retry_attempt` (the
retries spent on the study.max_retries). Unlike the callback it copies none of the replaced trial's user
attributes: its worker, its task and its fail reason are not the retry's.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial

from parallel_optuna import attributes as attr
from parallel_optuna.storage import optuna_internals

WAITING = optuna.trial.TrialState.WAITING


def history(trial: FrozenTrial) -> list[int]:
    """The chain a trial continues, oldest first ([] for a trial that is no retry)."""
    return list(trial.system_attrs.get(attr.RETRY_HISTORY) or [])


def chain(trial: FrozenTrial) -> list[int]:
    """history(), or for a retry linked by `retry_of` alone (enqueued by hand or by an older version) that one."""
    return history(trial) or (
        [trial.user_attrs[attr.RETRY_OF]] if trial.user_attrs.get(attr.RETRY_OF) is not None else []
    )


def replaced(trial: FrozenTrial) -> int | None:
    """The trial this one replaces (retry_history[-1]), or None."""
    chain = history(trial)
    return chain[-1] if chain else trial.user_attrs.get(attr.RETRY_OF)


def enqueue(study: optuna.Study, trial: FrozenTrial, attempt: int, user_attrs: dict | None = None) -> None:
    """Enqueue one retry of `trial` (a FrozenTrial), linked to its chain; returns nothing."""
    chain = [*history(trial), trial.number]
    system_attrs = {optuna_internals.FIXED_PARAMS: trial.params, attr.FAILED_TRIAL: chain[0], attr.RETRY_HISTORY: chain}
    attrs = {attr.RETRY_OF: trial.number, attr.RETRY_ATTEMPT: attempt, **(user_attrs or {})}
    if trial.user_attrs.get(attr.CONFIG_VERSION):
        attrs[attr.CONFIG_VERSION] = trial.user_attrs[attr.CONFIG_VERSION]  # its checkpoint's shapes depend on it
    study.add_trial(optuna.trial.create_trial(state=WAITING, system_attrs=system_attrs, user_attrs=attrs))


def add_result(study: optuna.Study, trial: FrozenTrial, values: list[float], user_attrs: dict) -> None:
    """A COMPLETE trial holding the result of `trial`, which was failed while its worker lived, linked to it
    as a retry is. Its curve and params are the trial's own."""
    chain = [*history(trial), trial.number]
    study.add_trial(
        optuna.trial.create_trial(
            state=optuna.trial.TrialState.COMPLETE,
            params=trial.params,
            distributions=trial.distributions,
            values=values,
            intermediate_values=trial.intermediate_values,
            system_attrs={attr.FAILED_TRIAL: chain[0], attr.RETRY_HISTORY: chain},
            user_attrs={**user_attrs, attr.RETRY_OF: trial.number, attr.RESULT_OF: trial.number},
        )
    )


def result_of(trials: list[FrozenTrial], number: int) -> FrozenTrial | None:
    """The trial that holds the result of trial `number`, recorded by its own worker after it was failed; or None."""
    return next((t for t in trials if t.user_attrs.get(attr.RESULT_OF) == number), None)
