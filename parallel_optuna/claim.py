"""Claiming a trial for this worker: its own after a requeue, a WAITING retry, or a new one asked of the sampler;
the heartbeat, the owner's marks, and the checkpoint a retry continues from."""

import contextlib
import logging
import os
import shutil
import threading
import time

import optuna

from parallel_optuna import attributes as attr
from parallel_optuna import (
    checkpoints,
    failures,
    liveness,
    repeats,
    retries,
    samplers,
)
from parallel_optuna.run_dir import run_dir
from parallel_optuna.slurm import hostname
from parallel_optuna.storage import optuna_internals
from parallel_optuna.study import now, still_to_run, study_budget
from parallel_optuna.trial_handle import PROGRESS

log = logging.getLogger("worker")
RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL


def find_own_trial(study, task):
    """The RUNNING trial a requeued array task left behind, if any."""
    if not task:
        return None
    for trial in study.get_trials(deepcopy=False, states=(RUNNING,)):
        if trial.user_attrs.get(attr.SLURM_TASK) == task:
            return trial
    return None


def trials_done_before(study, task):
    """How many trials this array task ended (COMPLETE, PRUNED or FAIL) before SLURM requeued it (a restart count > 0).

    A packed task (slurm.trials_per_task) runs its share once in all, not once per run; the trial it resumes runs
    whatever this count (an earlier run may have run a dead task's share too). A result kept for a trial failed
    under this task (retries.add_result) is the same trial, counted once.
    """
    if not requeued(task):
        return 0
    return sum(t.state.is_finished() and attr.RESULT_OF not in t.user_attrs for t in own_trials(study, task))


def task_share(study, task, trials, taken_over):
    """How many trials this process runs in all (0: until the budget): --trials, plus the share of each dead task
    it takes over. A requeued task keeps the shares it took over in its earlier runs: the largest share its
    trials recorded (record_owner)."""
    if not trials:
        return 0
    shares = [trials]
    if requeued(task):
        shares += [t.user_attrs.get(attr.SLURM_TASK_SHARE, 0) for t in own_trials(study, task)]
    return max(shares) + taken_over


def own_trials(study, task):
    """The trials this array task ran, in any of its runs."""
    return [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(attr.SLURM_TASK) == task]


def requeued(task):
    """Whether this process is the array task `task` run again (SLURM requeued it)."""
    return bool(task) and int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0


def trainer_is_broken(study, config):
    """An array task starts no trial once the trainer failed every trial since the user acted (failures.py).

    An array submitted after those failures tries first: a submit by hand (sbatch) records no time,
    and the user may have fixed what the YAML and the trainer's file do not show (a package, data).
    """
    if not liveness.slurm_task_key():
        return False  # a local worker stops after worker.MAX_FAILS_IN_A_ROW of its own; a debugging run always tries
    streak = failures.stopping(study, config)
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if not any(t.user_attrs.get(attr.SLURM_ARRAY_JOB_ID) == array for t in streak):
        return False  # an array submitted after those failures (sbatch by hand too) tries once: it may be fixed
    log.error("%s: this task starts no new trial; fix it, then submit again (make status)", failures.describe(streak))
    return True


def claim_trial(study, config, stop=None):
    """A new trial within the budget, or None when the budget is covered (or a stop signal came)."""
    budget = study_budget(study, config)
    samplers.import_models(study.sampler, study.get_trials(deepcopy=False))
    while True:
        # In turn, each ask sees the trials asked before it; random startup trials need not.
        with samplers.turn_to_ask(run_dir(config), study):
            trial, again = ask_once(study, config, budget)  # None, False: the budget is covered
        if not again:
            return trial
        if repeats.waits_in_a_row:
            wait_for_twin(study, config, stop)
        if stop and stop.received:
            return None


MAX_TWIN_DROPS = 3  # repeats of running trials a worker drops in a row before it waits without writing


def wait_for_twin(study, config, stop):
    """The proposal repeats a running trial (a small space): let it finish, then a repeat is answered from it.

    After MAX_TWIN_DROPS such repeats in a row the worker asks nothing (each ask would write one more FAIL
    trial) until some trial of the study ends: a 10-hour twin costs a few dropped trials, not thousands.
    """
    running = {t.number for t in study.get_trials(deepcopy=False, states=(RUNNING,))}
    patient = repeats.waits_in_a_row >= MAX_TWIN_DROPS
    if patient:
        log.info("the search space has fewer configs than workers: waiting for a running trial to end")
    delay = min(0.1 * 2**repeats.waits_in_a_row, 10.0)
    while not (stop and stop.received):
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not (stop and stop.received):
            time.sleep(0.1)
        liveness.fail_stale(study, config)  # a twin whose worker died would be waited for forever
        # Local workers' pids; while it waits patiently, the twins' array tasks too (one squeue per wait).
        liveness.reconcile(study, config, tasks="ask" if patient else None)
        if not patient or not running <= {t.number for t in study.get_trials(deepcopy=False, states=(RUNNING,))}:
            break
    if patient:
        repeats.waits_in_a_row = 0


def ask_once(study, config, budget):
    """(trial to run or None, whether to ask again): one ask, its params sampled and checked."""
    if still_to_run(study.get_trials(deepcopy=False), budget) <= 0:
        return None, False  # checked again in our turn: another worker's ask may have covered the budget since
    trial = study.ask()
    link_heartbeat_retry(study, trial)
    trials = study.get_trials(deepcopy=False)
    # Trial numbers are consecutive: everything numbered below ours existed when we asked.
    ahead = [t for t in trials if t.number < trial.number and t.state != FAIL]
    origin, kept = trial.user_attrs.get(attr.RETRY_OF), retries.result_of(trials, trial.user_attrs.get(attr.RETRY_OF))
    if len(ahead) >= budget:
        drop(study, trial, f"surplus: {len(ahead)} earlier trials already cover the budget of {budget}")
        return None, False
    if origin is not None and any(t.user_attrs.get(attr.RETRY_OF) == origin for t in ahead):
        drop(study, trial, f"duplicate retry of trial {origin}")  # SQLite can enqueue a retry twice
        return None, True
    if origin is not None and kept:
        drop(study, trial, f"retry of trial {origin}, whose worker lived: its result is trial {kept.number}")
        return None, True
    if repeats.settle(study, trial, config):  # params already tried: answered from its twin, or asked again
        return None, True
    return trial, False


def drop(study, trial, reason):
    trial.set_user_attr(attr.FAIL_REASON, reason)
    study.tell(trial, state=FAIL)
    log.info("trial %d dropped (%s)", trial.number, reason)


def link_heartbeat_retry(study, trial):
    """A retry made by Optuna's own RetryHeartbeatStaleTrialCallback gets the user attributes ours carry."""
    frozen = optuna_internals.frozen(study, trial)
    chain = retries.history(frozen)
    if chain and attr.RETRY_OF not in frozen.user_attrs:
        trial.set_user_attr(attr.RETRY_OF, chain[-1])
        trial.set_user_attr(attr.RETRY_ATTEMPT, len(chain))


@contextlib.contextmanager
def heartbeat(study, trial):
    """On RDB storages, beat as Study.optimize would; ask/tell alone sends no heartbeat."""
    interval = optuna_internals.heartbeat_interval(study)
    if not interval:
        yield
        return
    stopped = threading.Event()

    def beat():
        while True:
            optuna_internals.record_heartbeat(study, trial)
            if stopped.wait(interval):
                return

    thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()


def record_owner(trial, folder, config, share=0):
    """Who runs the trial, so any trial leads to its logs and any log to its trial; and its array task's share
    (task_share), which a requeue of the task still runs."""
    env, task = os.environ, liveness.slurm_task_key()
    attrs = {
        attr.PID: os.getpid(),
        attr.PID_START: liveness.process_start(os.getpid()),
        attr.STARTED_AT: trial.user_attrs.get(attr.STARTED_AT) or now(),
        attr.CONFIG_PATH: str(folder / "config.yaml"),
        attr.CONFIG_VERSION: config.version,
        attr.LOG_PATH: str(folder / "worker.log"),
        attr.SLURM_TASK: task,
        attr.SLURM_TASK_SHARE: share if task and share else None,
        attr.SLURM_ARRAY_JOB_ID: env.get("SLURM_ARRAY_JOB_ID"),
        attr.SLURM_ARRAY_TASK_ID: env.get("SLURM_ARRAY_TASK_ID"),
        attr.SLURM_JOB_ID: env.get("SLURM_JOB_ID"),
        attr.SLURM_RESTART_COUNT: int(env.get("SLURM_RESTART_COUNT", 0)),
        attr.NODE: env.get("SLURMD_NODENAME"),
        attr.CUDA_VISIBLE_DEVICES: env.get("CUDA_VISIBLE_DEVICES"),
    }
    if env.get("SLURM_ARRAY_JOB_ID"):
        logs = run_dir(config) / "slurm_logs" / f"optuna_{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
        attrs.update({attr.SLURM_OUT: f"{logs}.out", attr.SLURM_ERR: f"{logs}.err"})
    attrs[attr.HOST] = hostname()  # last: liveness judges a trial by its pid only once host is there
    for key, value in attrs.items():
        if value is not None and trial.user_attrs.get(key) != value:
            trial.set_user_attr(key, value)


def adopt_origin_checkpoint(study, trial, handle, config):
    """A retry continues from the newest checkpoint of its chain (the trial it replaces, else an older one
    whose retry died before copying it), curve included."""
    if handle.checkpoint.exists():
        return
    trials = run_dir(config) / "trials"
    chain = retries.chain(optuna_internals.frozen(study, trial))
    origin = next((n for n in reversed(chain) if (trials / str(n) / checkpoints.CHECKPOINT).exists()), None)
    if origin is None:
        return
    source = trials / str(origin) / checkpoints.CHECKPOINT
    partial = handle.checkpoint.with_suffix(".partial")
    shutil.copy(source, partial)
    os.replace(partial, handle.checkpoint)  # once it exists the copy is whole: cleanup may delete the source
    if (source.parent / PROGRESS).exists():
        shutil.copy(source.parent / PROGRESS, handle.folder / PROGRESS)
    dead = study.get_trials(deepcopy=False)[origin]  # numbered in order; study.trials would copy every trial
    for step, value in sorted(dead.intermediate_values.items()):
        trial.report(value, step)
    trial.set_user_attr(attr.REQUEUES, dead.user_attrs.get(attr.REQUEUES, 0))  # walltimes already spent count
    log.info("trial %d continues from trial %d's checkpoint", trial.number, origin)
