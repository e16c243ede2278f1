"""What a trial's code holds while it trains: the handle a trainer gets (report, checkpoint, should_prune),
the Optuna trial a plain objective gets, and the signal that asks both to stop at a safe point."""

import enum
import json
import logging
import math
import os
import re
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import optuna

from parallel_optuna import attributes as attr
from parallel_optuna import checkpoints, trial_control

log = logging.getLogger("worker")


class Outcome(enum.Enum):
    """How one trial's run in this process ended."""

    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"
    REQUEUED = "REQUEUED"  # checkpointed before the walltime; its own task was requeued and resumes it
    STOPPED = "STOPPED"  # checkpointed and left RUNNING: SLURM's requeue or the next reconcile continues it


# Raised from save_checkpoint() (or by a plain objective) once a stop signal arrived and the state is on disk.
Interrupted = trial_control.Stop


# What the batch shell sends srun for a TERM: srun passes it on to every rank (on TERM it kills them all).
SRUN_TERM = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, SRUN_TERM)


def signal_name(signum: int) -> str:
    return "SIGTERM" if signum == SRUN_TERM else signal.Signals(signum).name


class StopSignal:
    """Remembers SIGUSR2/SIGTERM/SIGINT so the trainer can finish its step and checkpoint first."""

    def __init__(self, safe_point: str = "save_checkpoint()", early_signals: Sequence[int] = ()) -> None:
        self.safe_point = safe_point  # where the trainer (or objective) checkpoints and stops
        self.received = signal_name(early_signals[-1]) if early_signals else None
        if self.received:
            log.warning("%s received while the worker started: checkpointing at the next %s", self.received, safe_point)
        self.interrupt_now = False  # while a plain objective runs that has not asked trial_control.stop_requested()
        self.deadline = None  # (seconds, what to do then) while such an objective runs: see ObjectiveTrial
        self.requeued = False  # once this task asked SLURM to requeue it
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        again = self.received == signal_name(signum)  # SLURM signals the batch shell, which forwards it
        self.received = signal_name(signum)
        if again:
            return
        if self.requeued:  # SLURM ends the task it was asked to requeue: the checkpoint is already on disk
            announce("%s received: the requeue ends this task", self.received)
            return
        if self.interrupt_now and self.deadline:  # never raised here: the signal may land inside a lock or a write
            seconds, end = self.deadline
            announce(
                "%s received: the objective stops at its next report, should_prune or suggest call (or in %d s)",
                self.received,
                seconds,
            )
            timer = threading.Timer(seconds, end, args=(self.received,))
            timer.daemon = True  # a worker whose objective stopped in time exits without waiting for it
            timer.start()
            return
        announce("%s received: checkpointing at the next %s", self.received, self.safe_point)


def announce(message, *args):
    """Log from a signal handler. From a thread: the code the signal interrupted may be writing a log
    record itself, and logging from the handler would re-enter that write (a RuntimeError); the
    thread waits for the logging lock instead."""
    threading.Thread(target=log.warning, args=(message, *args), name="signal-log").start()


class ObjectiveTrial(optuna.trial.Trial):
    """The optuna.Trial a plain objective gets: all of it, except that the tool's own attributes are kept safe,
    and that a stop signal is raised at its calls to Optuna (a safe point: no lock held, nothing half-written)."""

    def stop_point(self):
        stop = trial_control.Running.stop
        if stop is not None and stop.interrupt_now and stop.received:
            stop.interrupt_now = False
            raise Interrupted(stop.received)

    def suggest_float(self, *args, **kwargs):
        self.stop_point()
        return super().suggest_float(*args, **kwargs)

    def suggest_int(self, *args, **kwargs):
        self.stop_point()
        return super().suggest_int(*args, **kwargs)

    def suggest_categorical(self, *args, **kwargs):
        self.stop_point()
        return super().suggest_categorical(*args, **kwargs)

    def set_user_attr(self, key, value):
        if key in attr.TOOL_ATTRS:
            raise ValueError(
                f"user attribute {key!r} is the tool's own (liveness and status use it); use another name, "
                f"not one of {', '.join(sorted(attr.TOOL_ATTRS))}"
            )
        super().set_user_attr(key, value)

    failed_elsewhere = False  # a status judged its worker dead: reports are not stored, the result is

    def report(self, value, step):
        self.stop_point()
        try:
            super().report(value, step)
        except optuna.exceptions.UpdateFinishedTrialError:
            if not self.failed_elsewhere:
                log.warning("trial %d was failed by another process: training goes on, its result is kept", self.number)
            self.failed_elsewhere = True

    def should_prune(self):
        self.stop_point()
        return not self.failed_elsewhere and super().should_prune()


PROGRESS = "progress.jsonl"  # the curve of a trial with several objectives, one {"step", "value"} a line


class TrialHandle:
    """What a trainer gets besides its config: report, and checkpoints that survive a requeue."""

    def __init__(self, trial: optuna.Trial, folder: Path, stop: StopSignal, trusted: bool = False) -> None:
        self.trial, self.folder, self.stop = trial, folder, stop
        self.trusted = trusted  # study.trusted_checkpoints: unpickle anything (the trainer's own objects)
        self.checkpoint = folder / checkpoints.CHECKPOINT
        self.saves = 0
        self.reports_since_stop = 0
        self.failed_elsewhere = False  # a status judged this worker dead: reports are not stored, the result is

    @property
    def number(self) -> int:
        return self.trial.number

    def report(self, value: float, step: int) -> None:
        """Record the step's metric (Optuna's curve), prune if the pruner says so, stop after a signal."""
        if not math.isfinite(value):
            raise ValueError(f"metric is {value} at step {step}")
        if len(self.trial.study.directions) > 1:  # Optuna keeps no curve for several objectives, nor prunes them
            with open(self.folder / PROGRESS, "a") as f:
                f.write(json.dumps({"step": step, "value": value}) + "\n")
        elif not self.failed_elsewhere:
            try:
                self.trial.report(value, step)
            except optuna.exceptions.UpdateFinishedTrialError:
                log.warning("trial %d was failed by another process: training goes on, its result is kept", self.number)
                self.failed_elsewhere = True
        log.info("trial %d step %d: %.6g", self.trial.number, step, value)
        if len(self.trial.study.directions) == 1 and not self.failed_elsewhere and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}")
        if self.stop.received:
            self.reports_since_stop += 1
            # Two reports after the signal with no save in this process: a trainer that never checkpoints
            # stops here. At the first, a trainer that reports and then saves has yet to save.
            if not self.saves and self.reports_since_stop > 1:
                raise Interrupted(self.stop.received)

    def load_checkpoint(self) -> Any:
        """The state save_checkpoint() stored, loaded as data (tensors, numbers, strings, lists, dicts).

        Whoever can write a checkpoint.pt must not get to run code in the next trial that loads it;
        study.trusted_checkpoints: true loads any pickle, for state that needs more.
        """
        if not self.checkpoint.exists():
            return None
        log.info("trial %d resumes from %s", self.trial.number, self.checkpoint)
        return load_state(self.checkpoint, self.trusted)

    def save_checkpoint(self, state: Any) -> None:
        """Save the state atomically; after a walltime or preemption signal, stop here (the trial goes on)."""
        save_atomically(state, self.checkpoint)  # a kill mid-write never corrupts the last checkpoint
        self.saves += 1
        if self.stop.received:
            raise Interrupted(self.stop.received)

    def save_weights(self, state: Any) -> None:
        """The trained model (e.g. model.state_dict()): `make best` exports the best trial's as best_trial.pt."""
        save_atomically(state, self.folder / checkpoints.WEIGHTS)


class UntrustedCheckpoint(Exception):
    """A checkpoint that holds more than data, loaded without study.trusted_checkpoints: the trial fails."""


def load_state(path: Path, trusted: bool = False) -> Any:
    import pickle

    import torch  # only trainers that checkpoint need it; the worker's start-up stays light

    try:
        return torch.load(path, weights_only=not trusted)
    except pickle.UnpicklingError as e:
        if trusted:
            raise
        found = re.search(r"GLOBAL (\S+)", str(e))
        why = f"it would call {found.group(1)}" if found else "not loadable as data"
        raise UntrustedCheckpoint(
            f"{path} holds more than data ({why}), so it was not loaded; save tensors, numbers, lists and dicts, "
            "or set study.trusted_checkpoints: true if only your trainer can have written it"
        ) from None


def save_atomically(state: Any, path: Path) -> None:
    import torch  # only trainers that save need it; the worker's start-up stays light

    partial = path.with_suffix(".partial")
    try:
        with open(partial, "wb") as f:  # through a Python file a full disk is OSError ENOSPC, not RuntimeError
            torch.save(state, f)
    except BaseException as e:
        partial.unlink(missing_ok=True)  # a failed write (full disk) leaves no half file behind
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror, str(partial)) from e  # name the file that could not be written
        raise
    os.replace(partial, path)
