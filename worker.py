"""Run trials of an Optuna study: ask, train, tell. One array task of the SLURM job runs one of these.

    python worker.py --config config.example.yaml            # one trial, for local debugging
    python worker.py --exp_id baseline_LSTM_ishigami_cat --trials 0   # trials until the budget is met

For every trial the experiment YAML is read fresh from disk, the sampled params are written into
a copy of it and the trainer's update_config() recomputes the derived dimensions, so no trial
ever sees another trial's shapes. Per trial, runs/<study>/trials/<number>/ holds the resolved
config.yaml, metrics.json, worker.log and the latest checkpoint.

The trial's life:
- The study's budget (`n_trials`) counts finished trials in the whole study. A worker that finds
  it covered exits 0; one that was handed a trial beyond it (a race between workers) fails that
  trial as surplus, so the study never finishes more than the budget.
- Before asking, dead workers' trials are failed and retried (liveness.py), once per process; the
  worker that fails one runs the dead task's trials in its place (one, or slurm.trials_per_task:
  it may have died before its last ones), so an array loses no trial to a dead task.
- SLURM sends SIGUSR2 `signal_grace` seconds before the walltime: the trainer's next
  save_checkpoint() stores its state and the worker requeues its own array task, which then finds
  its RUNNING trial by its array ids and resumes it from the checkpoint. On SIGTERM (preemption,
  node failure, scancel) the trial is checkpointed and left RUNNING for SLURM's requeue, or for the
  next reconcile to retry from that checkpoint.
- A trainer exception or a NaN metric fails the trial with the reason stored on it; PRUNED is not FAIL.
- A paused or cancelled study (study_control.py) gets no new trial claimed; a stop by hand (Ctrl-C of a
  local run, or a cancelled study) fails the checkpointed trial, and a resubmission continues it.
"""

import signal

# SLURM may signal the walltime (USR2) or preemption (TERM) while this process is still starting up:
# note it before the heavy imports below, so that it is never lost nor fatal. SIGINT: Ctrl-C of a local
# run; SIGUSR1: a TERM, as the batch shell passes it through srun to several processes per trial.
EARLY_SIGNALS = []
if __name__ == "__main__":
    for _sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(_sig, lambda signum, frame: EARLY_SIGNALS.append(signum))

import json
import logging
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import optuna
import yaml

from parallel_optuna import (
    artifacts,
    checkpoints,
    claim,
    config_versions,
    failures,
    liveness,
    ranks,
    rendezvous,
    retries,
    study_control,
    trial_control,
)
from parallel_optuna import attributes as attr
from parallel_optuna.claim import adopt_origin_checkpoint, claim_trial, find_own_trial, heartbeat, record_owner
from parallel_optuna.config import metric_names, yaml_from_args
from parallel_optuna.optimizer import describe_sampler, values_text
from parallel_optuna.options import CommandLine, ConfigError, add_experiment_flags, flag_overrides
from parallel_optuna.run_dir import full_filesystem, full_filesystem_error, run_dir, run_subdir, trusted_run_dir
from parallel_optuna.search_space import sample_params
from parallel_optuna.slurm import requeue_task
from parallel_optuna.storage import optuna_internals
from parallel_optuna.study import (
    now,
    open_storage,
    open_study,
    still_to_run,
    storage_url,
    study_budget,
    without_credentials,
)
from parallel_optuna.trial_handle import Interrupted, ObjectiveTrial, Outcome, StopSignal, TrialHandle  # noqa: F401
from parallel_optuna.user_code import load_objective, load_trainer, prepare_data, resolve_config

log = logging.getLogger("worker")
RUNNING = optuna.trial.TrialState.RUNNING
FAIL = optuna.trial.TrialState.FAIL


# ---------------------------------------------------------------- command line
def parse_args(argv=None):
    parser = CommandLine(description=__doc__.split("\n\n")[0])
    add_experiment_flags(parser, ("study",))
    parser.add_argument("--storage_file", help="file holding the storage URL (keeps passwords out of job scripts)")
    parser.add_argument("--data_dir", help="read data.dir from here instead (data staged to scratch)")
    parser.add_argument(
        "--trials", type=int, default=1, help="trials to run in this process; 0 = until the budget is met"
    )
    parser.add_argument("--seed_offset", type=int, help="added to the sampler seed (default: SLURM job id or pid)")
    return parser.parse_args(argv)


def read_config(args):
    """The experiment YAML, fresh from disk, as this worker was told to see it.

    A file that is mid-edit, invalid or changes what a running study cannot change is not used:
    the worker goes on with the version in force (config_versions.py) and says why.
    """
    config = config_versions.load(yaml_from_args(args), flag_overrides(args), worker=True)
    return with_data_dir(config, args)


def pinned_config(trial, config, args):
    """A trial that resumes, or continues as a retry, trains with the config version it started with."""
    pinned = config_versions.pinned(trial, config, flag_overrides(args))
    return config if pinned is config else with_data_dir(pinned, args)


def with_data_dir(config, args):
    if args.data_dir:
        config.setdefault("data", {})["dir"] = str(Path(args.data_dir).resolve())
    return config


# ---------------------------------------------------------------- running one trial
def run_trial(study, trial, config, stop, share):
    """Train the trial and tell the study; the Outcome says whether it ended or goes on later."""
    folder = run_subdir(config, "trials", trial.number)
    file_log = logging.FileHandler(folder / "worker.log")
    file_log.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(file_log)
    try:
        record_owner(trial, folder, config, share)
        with heartbeat(study, trial), ranks.lead_trial(trial, folder, stop, config) as handle:
            return train_and_tell(study, trial, config, handle)
    finally:
        logging.getLogger().removeHandler(file_log)
        file_log.close()


def prepare_trial(study, trial, config, handle):
    """Sample (or recall) the params, write the resolved config, continue a dead origin's checkpoint."""
    resolved = resolve_config(config, sample_params(trial, config.get("search_space") or {}))
    (handle.folder / "config.yaml").write_text(yaml.safe_dump(without_credentials(resolved), sort_keys=False))
    log.info("trial %d params: %s", trial.number, trial.params)
    adopt_origin_checkpoint(study, trial, handle, config)
    return resolved


def train_and_tell(study, trial, config, handle):
    started = time.time()
    try:  # anything that goes wrong from here on fails this trial only, with the reason on it
        run = run_objective if config["study"]["objective"] else run_trainer
        metrics = run(study, trial, config, handle)
        names = metric_names(config, study)  # after the run: a plain objective may name them (set_metric_names)
        values = [metrics[name] for name in names]
        for name, value in zip(names, values, strict=True):
            if not isinstance(value, float) or not math.isfinite(value):
                raise ValueError(f"{name} is {value!r}; expected a finite number")
    except optuna.TrialPruned as e:
        add_train_seconds(trial, started)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        log.info("trial %d PRUNED%s", trial.number, f" ({e})" if str(e) else "")
        return Outcome.PRUNED
    except Interrupted as e:
        add_train_seconds(trial, started)
        return requeue_or_fail(study, trial, config, str(e) or handle.stop.received or "a stop", handle)
    except Exception as e:
        if full_filesystem(e) or ranks.rank_lost(handle):
            raise  # not the trial's fault: it stays RUNNING, and the next reconcile retries it from its checkpoint
        log.error("trial %d failed:\n%s", trial.number, traceback.format_exc())
        failures.fail_in_trainer(study, trial, f"{type(e).__name__}: {e}")
        return Outcome.FAIL
    (handle.folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
    try:
        add_train_seconds(trial, started)
        trial.set_user_attr(attr.METRICS, metrics)
        trial.set_user_attr(attr.FINISHED_AT, now())
        artifacts.register_trial_files(trial, handle.folder)  # before the tell: a told trial takes no artifact
        study.tell(trial, values if len(values) > 1 else values[0])
    except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
        if not finished_elsewhere(study, trial):
            raise
        keep_result(study, trial, config, metrics, values)
        return Outcome.COMPLETE
    log.info("trial %d COMPLETE: %s", trial.number, values_text(config, values))
    exported = config.get("best_trial") or {}
    if exported.get("value") is not None:  # a retrain of an export: beside what the trial measured then
        then = values_text(config, exported["value"])
        log.info("the exported trial %s of study %s measured %s", exported["number"], exported["study_name"], then)
    return Outcome.COMPLETE


def finished_elsewhere(study, trial):
    """Whether another process ended this trial while it ran here: a status or reconcile that judged its
    worker dead, or a heartbeat that came late."""
    return optuna_internals.frozen(study, trial).state != RUNNING


def keep_result(study, trial, config, metrics, values):
    """The trial was failed under a live worker (and a retry queued): its result is stored all the same,
    as a COMPLETE trial that continues it, linked as a retry is (retries.py), with its files. The retry
    queued by mistake is dropped when a worker claims it (ask_once)."""
    frozen = optuna_internals.frozen(study, trial)
    left_behind = (attr.FAIL_REASON, attr.RETRY_OF, attr.RETRY_ATTEMPT)  # the failed trial's, not the result's
    attrs = {k: v for k, v in frozen.user_attrs.items() if k not in left_behind}
    attrs.update({attr.METRICS: metrics, attr.FINISHED_AT: now()})
    retries.add_result(study, frozen, values, attrs)
    number = retries.result_of(study.get_trials(deepcopy=False), frozen.number).number
    old, new = run_dir(config) / "trials" / str(frozen.number), run_subdir(config, "trials", number)
    for name in (checkpoints.WEIGHTS, checkpoints.CHECKPOINT, "config.yaml", "metrics.json"):
        if (old / name).exists():
            os.replace(old / name, new / name)
    log.warning(
        "trial %d was failed while this worker trained it (%s); its result is kept as trial %d: %s",
        frozen.number,
        frozen.user_attrs.get(attr.FAIL_REASON, "no reason given"),
        number,
        values_text(config, values),
    )


def run_trainer(study, trial, config, handle):
    """The trainer API: the YAML's search space sampled into the config, the trainer's metrics back."""
    resolved = prepare_trial(study, trial, config, handle)
    with ranks.training(handle, config.version, study, trial):  # several processes: the others train it too
        metrics = plain_metrics(load_trainer(config, config.path)(resolved, handle))
    for metric in metric_names(config):
        if metric not in metrics:
            raise KeyError(f"the trainer's metrics {sorted(metrics)} have no {metric!r} (study.optimization_metric)")
    return metrics


def run_objective(study, trial, config, handle):
    """A plain Optuna objective(trial), unchanged: it suggests its own params and returns its value."""
    objective = load_objective(config, config.path)
    (handle.folder / "config.yaml").write_text(yaml.safe_dump(without_credentials(config), sort_keys=False))
    adopt_origin_checkpoint(study, trial, handle, config)
    trial_control.Running.folder, trial_control.Running.stop = handle.folder, handle.stop
    handle.stop.interrupt_now = True  # until the objective asks stop_requested() itself
    handle.stop.deadline = stop_deadline(config), lambda name: end_objective(study, trial, config, handle, name)
    try:
        if handle.stop.received:
            raise Interrupted(handle.stop.received)  # the signal came first: requeue before starting
        with ranks.training(handle, config.version, study, trial):
            value = objective(optuna_internals.live_trial(study, trial, ObjectiveTrial))
    finally:
        handle.stop.interrupt_now, handle.stop.deadline = False, None
        trial_control.Running.folder = trial_control.Running.stop = None
    log.info("trial %d params: %s", trial.number, optuna_internals.live_trial(study, trial).params)
    names, values = metric_names(config, study), list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) != len(names):
        raise TypeError(f"the objective returned {len(values)} value(s) for {len(names)} objective(s) ({names})")
    return plain_metrics(dict(zip(names, values, strict=True)))


def stop_deadline(config):
    """Seconds a plain objective has after the signal to reach a safe point: half of slurm.signal_grace, so that
    the requeue still comes before the walltime."""
    return max(1, config["slurm"]["signal_grace"] // 2)


def end_objective(study, trial, config, handle, signal_name):
    """The deadline passed and the objective reached no safe point: end this process between two storage ops.

    The trial goes on as at a safe point (requeue_or_fail: requeued, left RUNNING, or failed as stopped by
    hand). The exit waits for the storage's own lock, so no op of this process is half-written.
    """
    if not handle.stop.interrupt_now or trial_control.Running.folder != handle.folder:
        return  # it reached a safe point, or the objective ended, meanwhile
    log.warning("trial %d: the objective reached no safe point in %d s: ending it", trial.number, stop_deadline(config))
    outcome = requeue_or_fail(study, trial, config, signal_name, handle)
    with optuna_internals.storage_lock(study):
        logging.shutdown()
        os._exit(0 if outcome is Outcome.REQUEUED else STOPPED_EXIT)


STOPPED_EXIT = 143  # as a process ended by SIGTERM: the task ends, its trial goes on elsewhere


def plain_metrics(metrics):
    """A JSON-safe copy: numpy and torch scalars become floats, anything else not a number its text."""
    if not isinstance(metrics, dict):
        raise TypeError(f"trainer returned a {type(metrics).__name__}; expected a dict such as {{'val_loss': 0.1}}")
    plain = {}
    for key, value in metrics.items():
        try:
            plain[str(key)] = value if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            plain[str(key)] = str(value)
    return plain


def add_train_seconds(trial, started):
    seconds = trial.user_attrs.get(attr.TRAIN_SECONDS, 0) + time.time() - started
    trial.set_user_attr(attr.TRAIN_SECONDS, round(seconds, 3))


def requeue_or_fail(study, trial, config, signal_name, handle=None):
    """The trainer stopped at a safe point. Decide how the trial goes on after this process."""
    task, requeues = liveness.slurm_task_key(), trial.user_attrs.get(attr.REQUEUES, 0)
    saved = "checkpointed"
    if handle and config["study"]["objective"]:
        saved = "stopped"  # an objective's checkpoint may have any name
    elif handle and not handle.checkpoint.exists():
        saved = "stopped (no checkpoint: it restarts)"
    settings = config["study"]
    if not task or study_control.mark(study) == study_control.CANCELLED:  # stopped by hand: a resubmit retries it
        trial.set_user_attr(attr.FAIL_REASON, study_control.stop_reason(study, signal_name))
        study.tell(trial, state=FAIL)
        return Outcome.FAIL
    if signal_name == "SIGTERM":
        # Preemption or node failure: SLURM requeues the task and it resumes this trial.
        # scancel: the task is gone, and the next reconcile retries the trial from this checkpoint.
        log.info("trial %d %s after SIGTERM; left RUNNING for its task %s", trial.number, saved, task)
        return Outcome.STOPPED
    if requeues >= settings["max_requeues"]:
        frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == trial.number)
        reason = f"walltime reached after {requeues} requeues (study.max_requeues)"
        liveness.fail_and_retry(study, frozen, reason, settings["max_retries"], study_budget(study, config))
        return Outcome.FAIL
    trial.set_user_attr(attr.REQUEUES, requeues + 1)  # the walltime is spent whether or not the requeue works
    # Said before: the requeue's own SIGTERM may reach this process (and its log) before scontrol returns.
    log.info("trial %d %s before the walltime; requeueing its task %s", trial.number, saved, task)
    if handle:
        handle.stop.requeued = True
    problem = requeue_task(task)
    if problem:
        log.warning(
            "task %s could not be requeued (%s); trial %d stays RUNNING and the next reconcile retries it from "
            "its checkpoint",
            task,
            problem,
            trial.number,
        )
        return Outcome.STOPPED
    log.info("task %s requeued: it resumes trial %d", task, trial.number)
    return Outcome.REQUEUED


# ---------------------------------------------------------------- main loop
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)  # progress: the task's .out
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # We send the heartbeats ourselves (heartbeat() below), so ask/tell with them is by design.
    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used with Study.optimize")
    args = parse_args(argv)
    os.umask(os.umask(0) | 0o022)  # no file of the run directory writable by the group or others
    os.environ.update(rendezvous.rendezvous_env(os.environ))  # slurm.tasks_per_trial > 1: torch's rendezvous
    try:
        return work(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if not full_filesystem(e):
            raise
        print(full_filesystem_error(e, "the run directory", STAYS_RUNNING), file=sys.stderr)
        return 3
    finally:
        ranks.finish()
        trial_control.Running.artifacts = None  # a worker.main() called in-process leaves no store behind


STAYS_RUNNING = "the trial stays RUNNING and is retried from its last checkpoint by the next reconcile"


def work(args):
    config = read_config(args)
    # Every trial this process runs is the study's, on any rank: what its code uploads goes to the study's store.
    trial_control.Running.artifacts = artifacts.store(config)
    trusted_run_dir(config)  # on every rank, before its storage, checkpoints, logs or the ranks' files are opened
    if ranks.follower():
        return ranks.follow(config)  # ranks 1..N-1 of the trial's processes: they do what rank 0 says
    ranks.lead(config)
    storage = open_storage(config, storage_url(config, args.storage_file), config.path)
    study = open_study(config, storage, seed_offset(args), config.path)
    log.info("sampler: %s", describe_sampler(config))
    # A worker that fails a dead worker's trial also takes over its place in the array: a packed task
    # (slurm.trials_per_task) may have died before its last trials, so its whole share; the budget caps it.
    taken_over = len(liveness.reconcile(study, config)) * max(args.trials, 1)
    liveness.fail_stale(study, config)  # RDB storages: trials whose heartbeat stopped
    trial = find_own_trial(study, liveness.slurm_task_key())
    if trial is None and not still_to_run(study.get_trials(deepcopy=False), study_budget(study, config)):
        say_budget_covered(study, config)
        return 0  # decided before importing the trainer, which may take seconds (torch)
    load_user_code(config)
    enqueue_exported_params(study, config)
    return run_trials(study, trial, config, args, taken_over)


def load_user_code(config):
    """Import the trainer (or objective) and prepare the data it reads."""
    if config["study"]["objective"]:
        load_objective(config, config.path)
    else:
        load_trainer(config, config.path)
    prepare_data(config, config.path)


def run_trials(study, trial, config, args, taken_over):
    """Claim, run and tell trials until the budget, --trials or a signal says stop; 1 if any failed."""
    safe_point = "trial_control.stop_requested()" if config["study"]["objective"] else "save_checkpoint()"
    stop = StopSignal(safe_point, EARLY_SIGNALS)
    failed = in_a_row = 0
    task = liveness.slurm_task_key()
    done = claim.trials_done_before(study, task)  # requeued: resume, then the rest of the share
    share = claim.task_share(study, task, args.trials, taken_over)
    # After SIGTERM (scancel, preemption) no new trial starts; after the walltime signal, which SLURM may
    # send early, one does: it runs to its first checkpoint and continues after the requeue.
    while (trial is not None or more_wanted(done, share)) and stop.received not in ("SIGTERM", "SIGINT"):
        if trial is None:
            if study_control.hold_back(study):  # paused or cancelled: claim nothing
                break
            if claim.trainer_is_broken(study, config):
                failed += 1
                break
            liveness.fail_stale(study, config)  # RDB storages: trials whose heartbeat stopped
            trial = claim_trial(study, config, stop)
            if trial is None and args.trials == 0 and liveness.reconcile(study, config, tasks=None):
                continue  # a local worker died meanwhile (pid check, no SLURM query): take its retry
        else:
            log.info("resuming trial %d after a requeue", trial.number)
            trial = optuna_internals.live_trial(study, trial)
        if trial is None:
            if stop.received:
                log.info("%s received while waiting to claim a trial: no new trial starts", stop.received)
            else:
                say_budget_covered(study, config)
            break
        config = pinned_config(trial, config, args)
        outcome = run_trial(study, trial, config, stop, share)
        clean_checkpoints(study, config)
        failed += outcome is Outcome.FAIL
        in_a_row = in_a_row + 1 if outcome is Outcome.FAIL else 0
        done += 1
        if in_a_row >= MAX_FAILS_IN_A_ROW:
            log.error("%d trials in a row failed: this worker stops (reasons: make status)", in_a_row)
            break
        if outcome in (Outcome.REQUEUED, Outcome.STOPPED) or stop.received or ranks.task_ends():
            break
        trial = None
        # Fresh from disk for the next trial; after a task's last trial, for no one.
        config = read_config(args) if more_wanted(done, share) else config
    return 1 if failed else 0


def more_wanted(done, share):
    """Whether this process's share (claim.task_share; 0: until the budget) asks for another trial."""
    return not share or done < share


def say_budget_covered(study, config):
    log.info("budget of %d finished trials is covered: nothing to do", study_budget(study, config))
    retrained = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if "best_trial" in config and retrained:  # an export, run again
        log.info(
            "this export was retrained already: study %s, trial %d, %s; to retrain it again: --study_name <new name>",
            study.study_name,
            retrained[-1].number,
            values_text(config, retrained[-1].values),
        )


def enqueue_exported_params(study, config):
    """A best_trial.yaml of a plain objective retrains its params: its objective suggests them again."""
    params = (config.get("best_trial") or {}).get("params")
    if config["study"]["objective"] and params and not study.get_trials(deepcopy=False):
        study.enqueue_trial(params)


MAX_FAILS_IN_A_ROW = 3  # failed trials do not count toward the budget: a broken trainer must not loop forever


def clean_checkpoints(study, config):
    """A safe point: this trial is told. Delete what nobody will read again (checkpoints.py)."""
    files, freed = checkpoints.clean(study, config, everything=False)
    if files:
        log.info("deleted %d checkpoint/weights files of finished trials (%s freed)", files, checkpoints.size(freed))


def seed_offset(args):
    default = int(os.environ.get("SLURM_JOB_ID") or os.getpid())
    return default if args.seed_offset is None else args.seed_offset


if __name__ == "__main__":
    sys.exit(main())
