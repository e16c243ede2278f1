"""No configuration is trained twice unless the user asks for it.

A sampler may propose params that the study already holds (GP and grid samplers do, and two
workers asking at the same moment can race). "The same" means equal params as Optuna stores them.
Right after sampling, the worker calls settle():
- a repeat of a COMPLETE trial is answered from it: same value, same metrics, no training
  (user attr `duplicate_of`); it counts toward the budget like any finished trial;
- a repeat of a RUNNING, WAITING, PRUNED or FAIL trial is dropped (FAIL, `duplicate of ...`,
  which does not count toward the budget) and the worker asks again.
Exempt: retries of dead trials (`retry_of`), trials the user enqueued (`fixed_params`), and every
trial when `study.allow_repeats` is true (noisy objectives, where a repeat measures again).
"""

import logging

import optuna

from parallel_optuna import attributes as attr
from parallel_optuna.config_versions import compact
from parallel_optuna.options import ConfigError
from parallel_optuna.search_space import sample_params
from parallel_optuna.storage import optuna_internals
from parallel_optuna.study import now

log = logging.getLogger("worker")
COMPLETE = optuna.trial.TrialState.COMPLETE
FAIL = optuna.trial.TrialState.FAIL
MAX_IN_A_ROW = 20  # repeats of pruned or failed trials in a row before a worker gives up: the space looks exhausted
dropped_in_a_row = 0
waits_in_a_row = 0  # repeats of running or waiting trials in a row: the worker waits for them to finish


def settle(study, trial, config):
    """Sample the trial's params; True when they repeat a tried config and the trial is settled (ask again)."""
    global dropped_in_a_row, waits_in_a_row
    if config["study"]["objective"]:
        return False  # a plain objective suggests its own params inside the run
    try:
        params = sample_params(trial, config.get("search_space") or {})
    except Exception:
        return False  # the worker samples again inside the trial's fail path, which records why
    if config["study"]["allow_repeats"] or is_exempt(study, trial):
        return False
    twin = find_twin(study, trial.number, params)
    if twin is None or twin.state == COMPLETE:
        dropped_in_a_row = waits_in_a_row = 0
    if twin is None:
        return False
    if twin.state == COMPLETE:
        answer(study, trial, twin)
        return True
    if twin.state.is_finished():
        dropped_in_a_row, waits_in_a_row = dropped_in_a_row + 1, 0
    else:  # it may still finish, and a later repeat be answered from it: not a sign of an exhausted space
        waits_in_a_row += 1
    drop(study, trial, twin, config)
    return True


def answer(study, trial, twin):
    """Tell the repeat what its COMPLETE twin measured: no training."""
    trial.set_user_attr(attr.DUPLICATE_OF, twin.number)
    trial.set_user_attr(attr.METRICS, twin.user_attrs.get(attr.METRICS, {}))
    trial.set_user_attr(attr.FINISHED_AT, now())
    study.tell(trial, twin.values if len(twin.values) > 1 else twin.value)
    log.info("trial %d repeats trial %d: answered with %s, not trained", trial.number, twin.number, twin.values)


def drop(study, trial, twin, config):
    """Fail the repeat of a running, waiting, pruned or failed trial; it does not count toward the budget."""
    reason = f"duplicate of {twin.state.name.lower()} trial {twin.number}"
    trial.set_user_attr(attr.FAIL_REASON, reason)
    study.tell(trial, state=FAIL)
    log.info("trial %d dropped (%s): asking again", trial.number, reason)
    if dropped_in_a_row >= MAX_IN_A_ROW:
        raise ConfigError(
            config.path,
            "search_space",
            f"the sampler proposed {MAX_IN_A_ROW} configs in a row that are running, pruned or failed",
            "widen search_space, or set study.allow_repeats: true to train repeats",
        )


def is_exempt(study, trial):
    system = optuna_internals.system_attrs(study, trial)
    return attr.RETRY_OF in trial.user_attrs or optuna_internals.FIXED_PARAMS in system


def find_twin(study, number, params):
    """The trial with exactly these params, a COMPLETE one first; None if there is none."""
    twins = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number != number
        and t.params == params
        and not str(t.user_attrs.get(attr.FAIL_REASON, "")).startswith("dup")
    ]
    twins.sort(key=lambda t: (t.state != COMPLETE, t.number))
    return twins[0] if twins else None


def status_lines(config, trials):
    """Which finished trials repeat an earlier config: answered from it, or trained again."""
    answered = [t.number for t in trials if attr.DUPLICATE_OF in t.user_attrs]
    seen, trained = set(), []
    for t in sorted(trials, key=lambda t: t.number):
        if t.state.is_finished() and t.state != FAIL and attr.DUPLICATE_OF not in t.user_attrs:
            config_key = tuple(sorted(t.params.items()))
            if config_key in seen:
                trained.append(t.number)
            seen.add(config_key)
    lines = [f"repeats answered from an earlier trial, not trained: trials {compact(answered)}"] if answered else []
    if trained:
        plain = config["study"]["objective"]
        why = "a plain objective picks its params as it runs" if plain else "enqueued, or study.allow_repeats"
        lines.append(f"repeats trained again ({why}): trials {compact(trained)}")
    return lines
