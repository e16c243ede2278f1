"""Which sampler a study gets, and the seed each worker gives it.

`study.sampler` without a name is the default: chosen here from the search space and the budget
(measured in bench/README.md; docs/samplers.md, "Which sampler?"). With a name, the user's class
and options are used as given. Either way each worker seeds its sampler as that kind needs.
"""

import contextlib
import errno
import fcntl
import importlib
import importlib.util
import logging
import os
import time
from pathlib import Path

import optuna

from parallel_optuna.storage import optuna_internals

log = logging.getLogger("worker")
COMPLETE = optuna.trial.TrialState.COMPLETE

# Optional packages a sampler or pruner needs, with the pip command that installs them.
NEEDS = {"QMCSampler": "scipy", "GPSampler": "scipy", "WilcoxonPruner": "scipy", "CmaEsSampler": "cmaes"}
# Samplers whose workers must share one seed: QMC's sequence and the grid's order are study-wide
# (a sample counter, grid ids in system attrs); a different seed per worker gives a different sequence.
SHARED_SEED = ("QMCSampler", "GridSampler")
# The default for small spaces: GPSampler and TPESampler by turns, one trial each (ByTrial). GP alone
# plans best on smooth problems but loses on a multimodal one, where TPE finds the basins; by turns
# the default keeps most of GP's lead and stays level there (bench/README.md, docs/samplers.md).
PORTFOLIO = "GPSampler+TPESampler"
GP_MAX_PARAMS = 12  # a GP models small spaces well; past this TPE is the safer default
GP_MAX_TRIALS = 500  # a GP refits on every trial, cubic in their number: TPE stays fast
SEEDS = 2**32  # numpy's range, 0 .. 2**32 - 1: a seed plus a SLURM job id can pass it
ASK_LOCK = "ask.lock"  # in the run directory: workers take turns to sample
ASK_LOCK_TIMEOUT_S = 120  # past this a worker samples anyway (a holder stuck on a slow filesystem)
# A worker that waited this long for its turn is in a queue (a big start, a burst of trials ending together):
# the default proposes its trial with TPE, in milliseconds, not a GP's seconds (bench/README.md, B4) ...
QUEUE_WAIT_S = 2.0
# ... or this share of the study's median trial where that is longer: an idle GPU for 1% of a trial costs
# what 1% fewer trials would, and trials that end together would otherwise hand GP's share to TPE.
QUEUE_WAIT_SHARE = 0.01
CATCH_UP_S = 1.0  # how often a queued worker reads what the workers ahead of it wrote


def default_spec(space, n_trials):
    """The sampler a YAML without a sampler name gets: {"name": ..., options}."""
    if space and len(space) <= GP_MAX_PARAMS and n_trials <= GP_MAX_TRIALS and has_module("scipy"):
        return {"name": PORTFOLIO}
    return {"name": "TPESampler"}


def worker_seed(name, seed, offset, shared=False):
    """The seed this worker gives its sampler: a different one per worker, or one shared by all."""
    if name in SHARED_SEED or shared:
        return 0 if seed is None else seed % SEEDS  # never unseeded: each worker would draw its own
    return None if seed is None else (seed + offset) % SEEDS  # the same seed everywhere repeats the same configs


def resolve(spec, space, n_trials, offset):
    """The sampler's class name and its options for this worker, the default filled in."""
    spec = dict(spec)
    seed = spec.pop("seed", None)
    shared = spec.pop("shared_seed", False)  # samplers that walk one sequence (a QMC of your own, say)
    if "name" not in spec:
        spec.update(default_spec(space, n_trials))
    name = spec.pop("name")
    seed = worker_seed(name, seed, offset, shared)
    return name, ({**spec, "seed": seed} if seed is not None else spec)


def describe(spec, space, n_trials, objective=False):
    """One line for logs and --status: which sampler the study runs and why."""
    name, options = resolve(spec, space, n_trials, 0)
    options.pop("seed", None)
    shown = name + (f" {options}" if options else "")
    if "name" in spec:
        return f"{shown} (study.sampler)"
    if name == PORTFOLIO:
        return f"GPSampler and TPESampler by turns (default: {len(space)} params, {n_trials} trials)"
    if not space and objective:
        why = "no search_space in the YAML: the objective defines its own"
    elif not space:
        why = "search_space is empty: one config"
    else:
        why = "scipy not installed" if not has_module("scipy") else f"{len(space)} params, {n_trials} trials"
    return f"{shown} (default: {why})"


def has_module(name):
    """Whether the package is installed, without importing it (scipy alone takes a tenth of a second)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def missing_package(name):
    """The pip package a sampler or pruner class needs and lacks, else None."""
    package = NEEDS.get(name)
    return package if package and not has_module(package) else None


def portfolio(seed=None):
    """The default for small spaces: even trials sampled by GPSampler, odd ones by TPESampler."""
    # Two seeds per worker, none shared with another worker's (whose seeds differ by their offset):
    # with one seed the two samplers' random startup trials would be the same configs.
    gp_seed, tpe_seed = (None, None) if seed is None else (2 * seed % SEEDS, (2 * seed + 1) % SEEDS)
    tpe = optuna.samplers.TPESampler(seed=tpe_seed)  # constant liar: it plans around the RUNNING trials
    return ByTrial(optuna.samplers.GPSampler(seed=gp_seed), tpe, quick=tpe)


class ByTrial(optuna.samplers.BaseSampler):
    """A portfolio on one study: trial n is sampled by samplers[n % len(samplers)].

    By trial number, not by worker: every worker runs each sampler in turn, so the split stays even
    however long each sampler takes to choose (a GP refit takes seconds, TPE milliseconds). Each
    sampler sees every trial, whichever sampler chose it. A trial asked in a hurry (in_a_hurry())
    is the quick sampler's (one of them), whatever its number.
    """

    def __init__(self, *samplers, quick=None):
        assert quick is None or any(quick is s for s in samplers), "the quick sampler is one of the portfolio's"
        self.samplers, self.quick = samplers, quick
        self.hurry = None  # while a worker asks in a hurry: the seconds it waited for its turn
        self.hurried = set()  # numbers of the trials asked in a hurry: their sampler for every later call

    def _of(self, trial):
        if trial.number in self.hurried:
            return self.quick
        return self.samplers[trial.number % len(self.samplers)]

    def infer_relative_search_space(self, study, trial):
        return self._of(trial).infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._of(trial).sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._of(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        given = optuna_internals.FIXED_PARAMS in trial.system_attrs  # a retry or an enqueued trial: nothing to propose
        if self.hurry is not None and not given:  # set by in_a_hurry(), only where there is a quick sampler
            self.hurried.add(trial.number)
            log.info(
                "trial %d is proposed by %s: its worker waited %.1f s for the turn to ask",
                trial.number,
                type(self.quick).__name__,
                self.hurry,
            )
        self._of(trial).before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        for sampler in self.samplers:
            sampler.after_trial(study, trial, state, values)

    def reseed_rng(self):
        for sampler in self.samplers:
            sampler.reseed_rng()


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler for workers that ask and tell: an exhausted grid does not end the process.

    Optuna's calls study.stop() once every grid point was asked, which only works inside
    Study.optimize(); here it would raise after the last trial was told. The study's budget ends it.
    """

    def after_trial(self, study, trial, state, values):
        try:
            super().after_trial(study, trial, state, values)
        except RuntimeError as e:
            if "Study.stop" not in str(e):
                raise


def parts(sampler):
    return sampler.samplers if isinstance(sampler, ByTrial) else (sampler,)


def needs_turn(sampler, trials):
    """Whether the next ask must wait its turn: not while every part of the sampler samples at random
    (the startup trials), which needs to see no other trial. Other samplers always take their turn."""
    return not all(optuna_internals.still_random(part, trials) for part in parts(sampler))


def import_models(sampler, trials):
    """Import a GP's torch and scipy before the worker takes its turn to sample, not during it.

    The other workers wait out the turn: seconds of imports in it are seconds for each of them.
    """
    gp = [p for p in parts(sampler) if isinstance(p, optuna.samplers.GPSampler)]
    if any(optuna_internals.still_random(p, trials) is False for p in gp):
        optuna_internals.import_gp_modules()


@contextlib.contextmanager
def turn_to_ask(folder, study):
    """An ask's turn: none while the sampler samples at random, else one_ask_at_a_time(), in a hurry when
    the worker had to queue for it (queue_wait())."""
    sampler, trials = study.sampler, study.get_trials(deepcopy=False)
    if not needs_turn(sampler, trials):
        yield
        return
    queued, patience = time.monotonic(), queue_wait(trials)
    with one_ask_at_a_time(folder, while_waiting=catch_up(study)):
        waited = time.monotonic() - queued
        with in_a_hurry(sampler, waited) if waited > patience else contextlib.nullcontext():
            yield


def queue_wait(trials):
    """Seconds a worker waits for its turn before it asks in a hurry: QUEUE_WAIT_S, or QUEUE_WAIT_SHARE of the
    study's median COMPLETE trial where that is longer."""
    seconds = sorted(t.duration.total_seconds() for t in trials if t.state == COMPLETE and t.duration)
    return max(QUEUE_WAIT_S, QUEUE_WAIT_SHARE * seconds[len(seconds) // 2]) if seconds else QUEUE_WAIT_S


def catch_up(study):
    """What a queued worker does while it waits: read the journal's new entries, so that its turn replays only
    the last second's (each ask adds about 15 entries: in its turn the last of 256 would replay 4,000, about
    20 ms; 2.5 s summed over a start, bench B4). RDB storages read per query: nothing to catch up."""
    if not isinstance(optuna_internals.storage_of(study), optuna.storages.JournalStorage):
        return None
    return lambda: study.get_trials(deepcopy=False)


@contextlib.contextmanager
def in_a_hurry(sampler, waited):
    """The trial asked in this block is the portfolio's quick sampler's (TPE), not a GP's by its number.

    K workers that start together queue for their turns: a GP ask at hundreds of trials takes seconds, so
    the last of 256 would wait minutes (bench/README.md, B4). TPE proposes in milliseconds and, as a
    constant liar, around the trials asked before it. Another sampler is used as given.
    """
    if not isinstance(sampler, ByTrial) or sampler.quick is None:
        yield
        return
    sampler.hurry = waited
    try:
        yield
    finally:
        sampler.hurry = None


@contextlib.contextmanager
def one_ask_at_a_time(folder, while_waiting=None):
    """The study's workers sample their trials one after another (a fcntl lock in the run directory).

    Array tasks start together, and stay in step when their trials take about as long. K fresh
    processes asking a GPSampler at the same moment, none yet seeing the others' trials, proposed K
    near-copies of one point (bench/README.md). In turn, each ask sees the trials asked before it as
    RUNNING, with their params: GPSampler plans around them, TPE's constant liar too. The turn costs
    a worker the others' sampling time once per trial. Where the filesystem has no fcntl locks, or
    the lock is held past ASK_LOCK_TIMEOUT_S, the worker samples anyway. A waiting worker calls
    while_waiting every CATCH_UP_S.
    """
    try:
        fd = os.open(Path(folder) / ASK_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        fd = None
    try:
        deadline, caught_up = time.monotonic() + ASK_LOCK_TIMEOUT_S, time.monotonic()
        while fd is not None:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                    break
                if while_waiting and time.monotonic() - caught_up > CATCH_UP_S:
                    while_waiting()
                    caught_up = time.monotonic()
                time.sleep(0.02)
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
