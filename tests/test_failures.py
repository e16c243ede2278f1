"""When array tasks stop starting trials: the trainer failed every trial since the user last acted (failures.py)."""

import time

import optuna

from parallel_optuna import failures

FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE


def ended(*reasons):
    """Trials ended one after another: a reason is a FAIL's fail_reason, None a COMPLETE trial."""
    trials = []
    for reason in reasons:
        attrs = {} if reason is None else {"fail_reason": reason}
        state = COMPLETE if reason is None else FAIL
        trials.append(optuna.trial.create_trial(state=state, value=0.0 if reason is None else None, user_attrs=attrs))
        time.sleep(0.002)  # distinct end times
    return trials


def test_a_trainer_that_failed_every_trial_the_same_way_stops_new_ones():
    assert (
        len(failures.broken_streak(ended("KeyError: 'val_loss'", "KeyError: 'val_loss'", "KeyError: 'val_loss'"))) == 3
    )
    nan = [f"ValueError: metric is nan at step {s}" for s in (1, 4, 12)]
    assert failures.broken_streak(ended(*nan)), "the step differs, the reason is one"
    one_off = ended("RuntimeError: CUDA out of memory", *["KeyError: 'val_loss'"] * 4)
    assert len(failures.broken_streak(one_off)) == 5, "an earlier other failure does not hide the last three"


def test_a_trainer_that_works_for_some_configs_is_never_stopped():
    assert not failures.broken_streak(
        ended(None, "ValueError: nan at step 1", "ValueError: nan at step 2", "ValueError: nan at step 3")
    )
    assert not failures.broken_streak(ended("KeyError: 'a'", "RuntimeError: CUDA out of memory", "KeyError: 'a'"))


def test_failures_that_are_not_the_trainers_count_for_nothing():
    trials = ended("KeyError: 'a'", "worker died: 12_3 on node7 is gone", "KeyError: 'a'", "cancelled", "KeyError: 'a'")
    assert len(failures.broken_streak(trials)) == 3
    assert not failures.broken_streak(ended("worker died: x", "worker died: y", "worker died: z"))


def test_failures_before_the_user_acted_do_not_count():
    trials = ended("KeyError: 'a'", "KeyError: 'a'", "KeyError: 'a'")
    acted = time.time()
    assert failures.broken_streak(trials) and not failures.broken_streak(trials, since=acted)
    assert failures.broken_streak(trials + ended("KeyError: 'a'", "KeyError: 'a'", "KeyError: 'a'"), since=acted)
