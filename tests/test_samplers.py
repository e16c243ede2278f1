"""Which sampler a study gets, how each worker seeds it, and no configuration trained twice."""

import contextlib
import datetime
import logging
import math
import random
import subprocess
import sys

import optuna
import pytest
from conftest import PROJECT, load_study, plugin_experiment, run_script, write_experiment

import worker
from parallel_optuna import repeats, samplers
from parallel_optuna.config import load_config
from parallel_optuna.optimizer import build_sampler, describe_sampler
from parallel_optuna.options import ConfigError

X = {"model.d_pos": 4, "training.lr": 0.01}
Y = {"model.d_pos": 8, "training.lr": 0.002}


def config_with(tmp_path, changes=None):
    return load_config(write_experiment(tmp_path / "exp", changes))


def first_params(sampler, n=1):
    study = optuna.create_study(sampler=sampler)
    for _ in range(n):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1))
    return [t.params for t in study.trials]


# ---------------------------------------------------------------- the default
def test_a_yaml_without_a_sampler_name_gets_the_default_for_its_space(tmp_path):
    config = config_with(tmp_path, {"study.sampler": {}})
    default = build_sampler(config)
    assert [type(s).__name__ for s in default.samplers] == ["GPSampler", "TPESampler"]
    assert "GPSampler and TPESampler by turns (default" in describe_sampler(config)
    many = {f"model.p{i}": {"type": "float", "low": 0, "high": 1} for i in range(20)}
    config["search_space"] = many
    assert type(build_sampler(config)).__name__ == "TPESampler", "a large space gets TPE"
    config = config_with(tmp_path, {"study.sampler": {}, "study.n_trials": 5000})
    assert type(build_sampler(config)).__name__ == "TPESampler", "a large budget gets TPE"


def test_without_scipy_the_default_is_tpe_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(samplers, "has_module", lambda name: False)
    config = config_with(tmp_path, {"study.sampler": {}})
    assert type(build_sampler(config)).__name__ == "TPESampler"
    assert "scipy not installed" in describe_sampler(config)


def test_a_seed_without_a_name_seeds_the_default(tmp_path):
    config = config_with(tmp_path, {"study.sampler": {"seed": 0}})
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    one, two = build_sampler(config, 3), build_sampler(config, 3)
    study_one, study_two = optuna.create_study(sampler=one), optuna.create_study(sampler=two)
    assert study_one.ask(space).params == study_two.ask(space).params, "same seed, same worker: reproducible"
    assert type(one) is samplers.ByTrial


class Constant(optuna.samplers.BaseSampler):
    """Proposes x = value, every time."""

    def __init__(self, value):
        self.value = value

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.value


def test_the_default_portfolio_hands_trials_to_its_samplers_by_turns_whatever_the_worker():
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="s")
    workers = [
        optuna.load_study(study_name="s", storage=storage, sampler=samplers.ByTrial(Constant(0.25), Constant(0.75)))
        for _ in range(2)
    ]
    for worker_index in (0, 0, 0, 1, 1):  # one worker asks three times in a row: a fast sampler's worker would
        workers[worker_index].ask().suggest_float("x", 0, 1)
    assert [t.params["x"] for t in workers[0].trials] == [0.25, 0.75, 0.25, 0.75, 0.25]


def test_the_default_portfolios_two_samplers_start_with_different_configs():
    """Seeded alike, GP's and TPE's random startup trials would be the same configs, one of each pair wasted."""
    study = optuna.create_study(sampler=samplers.portfolio(seed=0))
    for _ in range(6):
        trial = study.ask()
        study.tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1))
    assert len({tuple(t.params.values()) for t in study.trials}) == 6


def test_a_seed_past_numpys_range_with_a_slurm_job_id_still_builds_every_sampler(tmp_path):
    for spec in ({"seed": 2**31}, {"name": "TPESampler", "seed": 2**32 - 1}, {"name": "QMCSampler", "seed": 2**33}):
        config = config_with(tmp_path, {"study.sampler": spec})
        [params] = first_params(build_sampler(config, seed_offset=4_294_967_000))
        assert set(params) == {"x", "y"} and all(0 <= v <= 1 for v in params.values()), (spec, params)


def test_options_without_a_sampler_name_are_one_clear_error(tmp_path):
    config = config_with(tmp_path, {"study.sampler": {"seed": 0, "n_startup_trials": 5}})
    with pytest.raises(ConfigError, match="study.sampler.*n_startup_trials without a sampler name.*name: TPESampler"):
        build_sampler(config)


def test_a_plain_objective_gets_tpe_even_beside_a_leftover_search_space(tmp_path):
    config = config_with(tmp_path, {"study.sampler": {}})
    config["study"]["objective"] = "objectives:quadratic"
    assert type(build_sampler(config)).__name__ == "TPESampler"
    assert "the objective defines its own" in describe_sampler(config)


def test_a_named_sampler_keeps_its_options_and_a_bad_seed_is_one_clear_error(tmp_path):
    config = config_with(tmp_path, {"study.sampler": {"name": "RandomSampler", "seed": 1}})
    assert type(build_sampler(config)).__name__ == "RandomSampler"
    assert "(study.sampler)" in describe_sampler(config)
    config["study"]["sampler"] = {"seed": "abc"}
    with pytest.raises(ConfigError, match="study.sampler.seed"):
        build_sampler(config)


# ---------------------------------------------------------------- seeds per worker
@pytest.mark.parametrize("name", ["TPESampler", "RandomSampler", "GPSampler"])
def test_model_based_and_random_samplers_get_a_different_seed_in_each_worker(tmp_path, name):
    config = config_with(tmp_path, {"study.sampler": {"name": name, "seed": 0}})
    assert first_params(build_sampler(config, 1)) != first_params(build_sampler(config, 2))
    assert first_params(build_sampler(config, 1)) == first_params(build_sampler(config, 1))


def test_the_default_gets_different_seeds_in_each_worker(tmp_path):
    config = config_with(tmp_path, {"study.sampler": {"seed": 0}})
    first = [first_params(build_sampler(config, offset), 2) for offset in range(3)]
    assert len({tuple(tuple(p.values()) for p in params) for params in first}) == 3
    assert first_params(build_sampler(config, 1), 2) == first[1]


def test_qmc_workers_share_one_seed_and_walk_one_sequence_together(tmp_path):
    config = config_with(tmp_path, {"study.sampler": {"name": "QMCSampler", "seed": 0}})
    alone = first_params(build_sampler(config, 0), 4)
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="qmc")
    workers = [optuna.load_study(study_name="qmc", storage=storage, sampler=build_sampler(config, i)) for i in (7, 9)]
    for i in range(4):  # two workers taking turns, as two array tasks would
        trial = workers[i % 2].ask()
        workers[i % 2].tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1))
    assert [t.params for t in workers[0].trials] == alone


def test_grid_workers_share_one_order_and_cover_the_grid_without_repeats(tmp_path):
    grid = {"name": "GridSampler", "search_space": {"x": [0.1, 0.2, 0.3], "y": [0.3, 0.4]}}
    config = config_with(tmp_path, {"study.sampler": grid})
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(storage=storage, study_name="grid")
    workers = [optuna.load_study(study_name="grid", storage=storage, sampler=build_sampler(config, i)) for i in (3, 5)]
    for i in range(4):
        trial = workers[i % 2].ask()
        workers[i % 2].tell(trial, trial.suggest_float("x", 0, 1) + trial.suggest_float("y", 0, 1))
    assert len({tuple(sorted(t.params.items())) for t in workers[0].trials}) == 4, "4 trials, 4 grid points"


# ---------------------------------------------------------------- no configuration trained twice
class Proposes(optuna.samplers.BaseSampler):
    """A sampler that proposes the given configs in turn (as a GP or a race between workers may)."""

    def __init__(self, *configs):
        self.configs, self.asked = list(configs), -1

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def before_trial(self, study, trial):
        self.asked += 1

    def sample_independent(self, study, trial, name, distribution):
        return self.configs[min(self.asked, len(self.configs) - 1)][name]


def study_with(config, *configs):
    return optuna.create_study(sampler=Proposes(*configs))


def test_a_repeat_of_a_complete_config_is_answered_from_it_without_training(tmp_path):
    config = config_with(tmp_path, {"study.n_trials": 3})
    study = study_with(config, X, X, Y)
    first = worker.claim_trial(study, config)
    first.set_user_attr("metrics", {"val_mae_mean": 0.25})
    study.tell(first, 0.25)
    trial = worker.claim_trial(study, config)  # the sampler repeats X, then proposes Y
    assert trial.params == Y
    answered = study.trials[1]
    assert (answered.state.name, answered.value, answered.params) == ("COMPLETE", 0.25, X)
    assert answered.user_attrs["duplicate_of"] == 0 and answered.user_attrs["metrics"] == {"val_mae_mean": 0.25}


def test_a_repeat_of_a_running_config_is_sampled_again_and_costs_no_budget(tmp_path):
    config = config_with(tmp_path, {"study.n_trials": 2})
    study = study_with(config, X, X, Y)
    running = worker.claim_trial(study, config)
    trial = worker.claim_trial(study, config)
    assert (running.params, trial.params) == (X, Y), "two workers, two different configs"
    dropped = study.trials[1]
    assert dropped.state.name == "FAIL" and dropped.user_attrs["fail_reason"] == "duplicate of running trial 0"
    assert worker.still_to_run(study.trials, 2) == 0, "the dropped repeat does not count; the two trials do"


def test_a_repeat_of_a_pruned_config_is_sampled_again(tmp_path):
    config = config_with(tmp_path)
    study = study_with(config, X, X, Y)
    study.tell(worker.claim_trial(study, config), state=optuna.trial.TrialState.PRUNED)
    assert worker.claim_trial(study, config).params == Y
    assert study.trials[1].user_attrs["fail_reason"] == "duplicate of pruned trial 0"


def test_an_enqueued_repeat_and_allowed_repeats_are_trained(tmp_path):
    config = config_with(tmp_path)
    study = study_with(config, X, X)
    study.tell(worker.claim_trial(study, config), 0.5)
    study.enqueue_trial(X)
    assert worker.claim_trial(study, config).params == X, "the user enqueued it on purpose"
    config["study"]["allow_repeats"] = True
    assert worker.claim_trial(study, config).params == X, "study.allow_repeats: true trains repeats"


def test_a_sampler_stuck_on_tried_configs_stops_the_worker_with_a_clear_error(tmp_path):
    config = config_with(tmp_path, {"study.n_trials": 50})
    study = study_with(config, X)
    study.tell(worker.claim_trial(study, config), state=optuna.trial.TrialState.PRUNED)
    repeats.dropped_in_a_row = 0
    with pytest.raises(ConfigError, match="allow_repeats"):
        worker.claim_trial(study, config)


def test_a_plain_objective_gets_tpe_by_default():
    assert samplers.default_spec({}, 20) == {"name": "TPESampler"}
    assert "the objective defines its own" in samplers.describe({}, {}, 20, objective=True)
    assert "search_space is empty: one config" in samplers.describe({}, {}, 1), "an export retrains one config"


def test_random_startup_asks_take_no_turn_and_model_based_asks_do(tmp_path):
    """A start of hundreds of tasks samples at random: no ask waits for another's there."""
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    finished = [optuna.trial.create_trial(params={"x": i / 10}, distributions=space, value=i) for i in range(10)]
    default = build_sampler(config_with(tmp_path, {"study.sampler": {}}))
    assert not samplers.needs_turn(default, finished[:9]), "GP and TPE both sample their startup trials at random"
    assert samplers.needs_turn(default, finished), "past 10 finished trials both model them"
    assert samplers.needs_turn(optuna.samplers.TPESampler(n_startup_trials=20), finished) is False
    assert samplers.needs_turn(optuna.samplers.CmaEsSampler(), []), "a sampler it cannot tell about takes its turn"


def test_workers_that_ask_at_once_take_turns_so_gp_does_not_propose_one_point_k_times(tmp_path):
    """Array tasks start together; each ask must see the trials asked before it (samplers.one_ask_at_a_time)."""
    path = plugin_experiment(
        tmp_path,
        {
            "study.sampler": {"name": "GPSampler", "seed": 0},
            "study.n_trials": 14,
            "training.sleep": 3.0,
            "training.epochs": 1,
        },
    )
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    study = load_study(path)
    space = {
        "model.d_pos": optuna.distributions.IntDistribution(2, 12, step=2),
        "training.lr": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True),
    }
    rng = random.Random(0)
    for _ in range(10):  # past GPSampler's 10 random startup trials
        params = {"model.d_pos": rng.choice(range(2, 13, 2)), "training.lr": 10 ** rng.uniform(-3, -1.53)}
        value = (math.log10(params["training.lr"]) + 2) ** 2 + params["model.d_pos"] / 100
        study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=value))
    command = [sys.executable, str(PROJECT / "worker.py"), "--config", str(path), "--study_name", "tiny"]
    workers = [subprocess.Popen([*command, "--seed_offset", str(i)], stdout=subprocess.DEVNULL) for i in range(4)]
    assert [w.wait(timeout=240) for w in workers] == [0] * 4
    asked = [t.params for t in load_study(path).trials[10:]]
    assert len(asked) == 4
    assert len({(p["model.d_pos"], round(p["training.lr"], 4)) for p in asked}) == 4, asked


def test_a_worker_that_queued_for_its_turn_asks_the_quick_sampler_and_one_that_did_not_asks_by_number(
    tmp_path, monkeypatch, caplog
):
    """A big start: a worker that waited QUEUE_WAIT_S for the turn gets TPE's proposal, not a GP's seconds."""
    monkeypatch.setattr(samplers, "QUEUE_WAIT_S", 0.3)
    quick = Constant(0.75)
    portfolio = samplers.ByTrial(Constant(0.25), quick, quick=quick)
    study = optuna.create_study(sampler=portfolio)
    with another_worker_holding_the_turn(tmp_path, seconds=0.6):
        with samplers.turn_to_ask(tmp_path, study):  # waits out the holder
            hurried = study.ask()
            hurried.suggest_float("x", 0, 1)
    with samplers.turn_to_ask(tmp_path, study):  # the turn is free
        by_number = study.ask()
        by_number.suggest_float("x", 0, 1)
    assert hurried.params["x"] == 0.75 and by_number.params["x"] == 0.75, "trial 0 in a hurry, trial 1 by number"
    assert hurried.suggest_float("y", 0, 1) == 0.75, "a hurried trial stays the quick sampler's after its ask"
    assert study.ask().suggest_float("x", 0, 1) == 0.25, "trial 2 by its number again"

    study.enqueue_trial({"x": 0.1})  # a retry's params, say: given, not proposed
    with caplog.at_level(logging.INFO, logger="worker"), samplers.in_a_hurry(portfolio, waited=3.0):
        retry = study.ask()
    assert retry.suggest_float("x", 0, 1) == 0.1 and "proposed by" not in caplog.text, caplog.text
    with caplog.at_level(logging.INFO, logger="worker"), samplers.in_a_hurry(portfolio, waited=3.0):
        study.ask()
    assert "trial 4 is proposed by Constant: its worker waited 3.0 s for the turn to ask" in caplog.text


def test_a_worker_waits_longer_before_a_hurry_when_the_studys_trials_are_long():
    """A worker's GPU idle for 1% of a trial costs what 1% fewer trials would: GP is waited for up to there."""
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    start = datetime.datetime(2026, 12, 7)

    def trial(minutes):
        timed = optuna.trial.create_trial(params={"x": 0.5}, distributions=space, value=0.0)
        timed.datetime_start, timed.datetime_complete = start, start + datetime.timedelta(minutes=minutes)
        return timed

    assert samplers.queue_wait([]) == samplers.QUEUE_WAIT_S, "a study with no trial timed yet"
    assert samplers.queue_wait([trial(1), trial(2)]) == samplers.QUEUE_WAIT_S, "1% of 2 minutes is under 2 s"
    assert samplers.queue_wait([trial(60), trial(50), trial(1)]) == pytest.approx(30.0), "1% of the median, 50 min"


def test_a_queued_worker_reads_the_others_entries_while_it_waits(tmp_path, monkeypatch):
    monkeypatch.setattr(samplers, "CATCH_UP_S", 0.1)
    calls = []
    with another_worker_holding_the_turn(tmp_path, seconds=0.6):
        with samplers.one_ask_at_a_time(tmp_path, while_waiting=lambda: calls.append(1)):
            pass
    assert len(calls) >= 3, "read about every CATCH_UP_S while the other worker held the turn"
    journal = optuna.create_study(
        storage=optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(tmp_path / "journal.log"))
        )
    )
    assert samplers.catch_up(journal) is not None and samplers.catch_up(optuna.create_study()) is None


@contextlib.contextmanager
def another_worker_holding_the_turn(folder, seconds):
    """Another process holds the ask lock from now for `seconds`."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_THE_TURN, str(folder / samplers.ASK_LOCK), str(seconds)], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"held\n"
        yield
        assert holder.wait(timeout=10) == 0
    finally:
        holder.kill()


HOLD_THE_TURN = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.lockf(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""
