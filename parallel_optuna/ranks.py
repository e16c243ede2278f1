"""Several processes training one trial (slurm.tasks_per_trial > 1): srun (or --local's launcher, local.py)
starts one worker per process; rendezvous.py says which rank each is.

Rank 0 is the worker as with one process: it claims the trial, reports, decides pruning, checkpoints and
tells. The other ranks never open the study; they follow rank 0 through small files of their own
channel folder, runs/<study>/ranks/<job id>.<restart>/ (local-<host>-<launcher pid>-<worker>/ under --local):
    trial.json        the trial rank 0 runs now (its folder holds the resolved config.yaml and the
                      checkpoint), or that this task runs no more trials
    <trial>.jsonl     rank 0's verdict at each report()/save_checkpoint() (or stop_requested() of a plain
                      objective), one line per call: go on, pruned, or stop (a signal); then the trial's end
    <trial>.rank<r>.failed   that rank's trainer raised (its reason)
    rank<r>.left             that rank reads the folder no more; once all did, rank 0 deletes the folder
So every rank stops at the same step, whichever rank a signal reached first, and none trains on alone.
A rank that dies ends the others (srun --kill-on-bad-exit=1, or the local launcher): the trial stays RUNNING
and, as for any dead worker, liveness.py fails it once and retries it from rank 0's checkpoint.
A trainer that raises on some ranks only fails the trial as the trainer's, with the first reason; the others
may wait for the failed ones in a collective that never comes, so rank 0 then ends the task with a non-zero
status (which ends the others) and the task runs no more trials. Where every rank raised, the task goes on.

Rank 0 finds a free port on its host for torch's rendezvous and writes it into trial.json before any rank
starts torch; so a trainer written for torchrun calls init_process_group() unchanged.
"""

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import optuna
import yaml

from parallel_optuna import checkpoints, failures, liveness, rendezvous, slurm, trial_control
from parallel_optuna.config import Config
from parallel_optuna.rendezvous import free_port, rank, world_size
from parallel_optuna.run_dir import run_dir, run_subdir
from parallel_optuna.storage import optuna_internals
from parallel_optuna.trial_handle import Interrupted, TrialHandle, load_state
from parallel_optuna.user_code import code_key, load_function

log = logging.getLogger("worker")

POLL_S, POLL_MAX_S = 0.02, 0.5  # a wait for another rank's file polls every 20 ms at first, then less often
PRUNED = "pruned"
LOST_RANK_WAIT_S = 5  # srun sends rank 0 SIGTERM within a fraction of a second of another rank's death
FOLLOWER_WAIT_S = 60  # a rank whose trainer raised waits this long for rank 0 to end the trial too
WATCH_S = 0.5  # how often rank 0 looks for another rank's failure while its trainer runs (a folder listing)
LEAVE_WAIT_S = 10  # rank 0 at its end waits this long for the others to leave before deleting the folder


def pauses():
    """The sleeps of a wait for another rank: short at first, then up to POLL_MAX_S, to spare a network
    filesystem the listings of a long wait."""
    pause = POLL_S
    while True:
        yield pause
        pause = min(pause * 1.5, POLL_MAX_S)


def follower() -> bool:
    return rank() > 0


# ---------------------------------------------------------------- the files between the ranks
def channel(config, name: str | None = None) -> Path:
    """The folder of files between one trial's ranks, this process's by default (made private, in the run
    directory already trusted)."""
    return run_subdir(config, "ranks", name or os.environ[rendezvous.CHANNEL])


def write_atomically(path: Path, data: dict) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


class TrialOver(BaseException):
    """Rank 0 ended the trial (told it, or it failed there) while this rank waited for its verdict."""


class LauncherGone(BaseException):
    """The --local launcher that started this rank is gone (killed: it could not end its ranks)."""


def check_launcher() -> None:
    """A rank other than 0 that --local started ends once its launcher is gone: if rank 0 died too, nobody would
    end it. (srun's ranks are ended by SLURM.)"""
    launcher = rendezvous.local_launcher(os.environ[rendezvous.CHANNEL])
    if launcher is not None and os.getppid() != launcher[1]:
        raise LauncherGone(launcher[1])


class Verdicts:
    """Rank 0's verdicts on one trial, read in order by another rank."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset = path, 0

    def next(self, timeout: float | None = None) -> str | None:
        """The next verdict: None (go on), PRUNED or a signal's name; TrialOver once the trial ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        sleeps = pauses()
        while deadline is None or time.monotonic() < deadline:
            with open(self.path) as f:
                f.seek(self.offset)
                line = f.readline()
            if line.endswith("\n"):  # a line still being written is read again whole
                self.offset += len(line.encode())
                entry = json.loads(line)
                if "over" in entry:
                    raise TrialOver(entry["over"])
                return entry["verdict"]
            check_launcher()
            time.sleep(next(sleeps))
        raise TimeoutError(f"no word from rank 0 in {timeout} s ({self.path})")

    def agree(self, asked: bool) -> bool:
        """trial_control.stop_requested() on this rank: rank 0's answer."""
        return self.next() is not None


class Leader:
    """Rank 0's side of the channel."""

    def __init__(self, config) -> None:
        self.folder = channel(config)
        self.port = free_port()
        os.environ["MASTER_PORT"] = str(self.port)  # for rank 0's torch; the others read it in trial.json
        self.seq = 0
        self.verdicts = None
        self.lock = threading.Lock()  # who ends a trial whose trainer raised: rank 0's own thread or its watch
        self.training: int | None = None  # the trial whose trainer runs on rank 0 now
        self.ending = False  # the watch ends the trial and this process
        self.ends_task = False  # other ranks may wait in a collective, or are gone: this task runs no more trials

    def announce(self, news: dict) -> None:
        self.seq += 1
        write_atomically(self.folder / "trial.json", {"seq": self.seq, "port": self.port, **news})

    def start(self, number: int, version: str | None) -> None:
        self.verdicts = self.folder / f"{number}.jsonl"
        self.verdicts.write_text("")
        for old in self.folder.glob(f"{number}.rank*.failed"):
            old.unlink()
        self.announce({"trial": number, "version": version})

    def decide(self, verdict: str | None) -> None:
        with open(self.verdicts, "a") as f:
            f.write(json.dumps({"verdict": verdict}) + "\n")

    def agree(self, asked: bool) -> bool:
        """trial_control.stop_requested() on rank 0: its own answer, handed to the others."""
        self.decide("stop" if asked else None)
        return asked

    def over(self, outcome: str) -> None:
        if self.verdicts:
            with open(self.verdicts, "a") as f:
                f.write(json.dumps({"over": outcome}) + "\n")
            self.verdicts = None

    def failed(self, number: int) -> list[Path]:
        return sorted(self.folder.glob(f"{number}.rank*.failed"))

    def followers_failed(self, number: int) -> bool:
        return len(self.failed(number)) >= world_size() - 1

    def others_left(self, timeout: float) -> bool:
        deadline, sleeps = time.monotonic() + timeout, pauses()
        while len(list(self.folder.glob("rank*.left"))) < world_size() - 1:
            if time.monotonic() > deadline:
                return False
            time.sleep(next(sleeps))
        return True


LEADER: Leader | None = None


def lead(config) -> None:
    """Rank 0 of several: open the channel the others wait on."""
    global LEADER
    if world_size() > 1 and LEADER is None:
        LEADER = Leader(config)


def finish() -> None:
    """Rank 0 ends: the others end too; once they all left, the task's folder goes (else the submit's clean)."""
    if LEADER is None:
        return
    LEADER.over("ended")
    LEADER.announce({"done": True})
    if not LEADER.ends_task and LEADER.others_left(LEAVE_WAIT_S):
        shutil.rmtree(LEADER.folder, ignore_errors=True)


def task_ends() -> bool:
    """Whether this task runs no more trials: other ranks may still wait in a collective of the last one."""
    return LEADER is not None and LEADER.ends_task


def remove_leftovers(config) -> int:
    """Delete the folders of tasks SLURM no longer holds, and of --local launchers gone from this host (each ended
    before its ranks all left); how many."""
    folder = run_dir(config) / "ranks"
    gone = tasks_gone(list(folder.glob("*.*"))) + [p for p in folder.glob("local-*") if launcher_gone(p.name)]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return len(gone)


def tasks_gone(folders: list[Path]) -> list[Path]:
    """The folders of SLURM tasks (<job id>.<restart>) whose job SLURM no longer holds."""
    runs = [p for p in folders if p.name.partition(".")[0].isdigit()]
    if not runs:
        return []
    held = slurm.squeue_jobs({p.name.partition(".")[0] for p in runs}, fields="%A")
    if held is None:
        return []  # SLURM did not answer: keep them all
    held_jobs = {row[0].strip() for row in held}
    return [p for p in runs if p.name.partition(".")[0] not in held_jobs]


def launcher_gone(channel_name: str) -> bool:
    """Whether the --local launcher of this channel ran on this host and runs no more (another host's: unknown)."""
    launcher = rendezvous.local_launcher(channel_name)
    return launcher is not None and launcher[0] == slurm.hostname() and liveness.process_start(launcher[1]) is None


# ---------------------------------------------------------------- rank 0's trial
class LeaderHandle(TrialHandle):
    """The trainer's handle on rank 0: as with one process, and each verdict handed to the other ranks."""

    def report(self, value: float, step: int) -> None:
        self.agreed(super().report, value, step)

    def save_checkpoint(self, state) -> None:
        self.agreed(super().save_checkpoint, state)

    def agreed(self, call, *args) -> None:
        try:
            call(*args)
        except optuna.TrialPruned:
            LEADER.decide(PRUNED)
            raise
        except Interrupted as e:
            LEADER.decide(str(e) or "stop")
            raise
        LEADER.decide(None)


@contextlib.contextmanager
def lead_trial(trial, folder: Path, stop, config):
    """The trial's handle; with several processes, the others learn when rank 0 ends it."""
    trusted = config["study"]["trusted_checkpoints"]
    if LEADER is None:
        yield TrialHandle(trial, folder, stop, trusted)
        return
    try:
        yield LeaderHandle(trial, folder, stop, trusted)
    finally:
        trial_control.Running.agree = None
        LEADER.over("told")


@contextlib.contextmanager
def training(handle, version: str | None, study, trial):
    """Around rank 0's trainer: the resolved config.yaml (and any checkpoint to resume) is in the trial's
    folder, so the others start; while it trains, a watch ends the trial and the task if another rank raised
    alone."""
    if LEADER is None:
        yield
        return
    LEADER.start(handle.number, version)
    # A plain objective stops where every rank asks trial_control.stop_requested(), never in between.
    handle.stop.interrupt_now = False
    trial_control.Running.agree = LEADER.agree
    LEADER.training, LEADER.ending = handle.number, False
    end_task = another_rank_failed(study, trial)
    threading.Thread(target=watch, args=(handle.number, end_task), name="ranks-watch", daemon=True).start()
    try:
        yield
    finally:
        with LEADER.lock:
            LEADER.training, ending = None, LEADER.ending
        if ending:
            threading.Event().wait()  # the watch tells the trial and ends this process


def another_rank_failed(study, trial):
    """What ends a trial whose trainer raised on another rank while rank 0 waits for it in a collective: the
    trainer's failure, then this task (its non-zero exit makes srun end the others)."""

    def end_task(reason):
        try:
            failures.fail_in_trainer(study, trial, reason)
        finally:
            finish()
            with optuna_internals.storage_lock(study):  # no storage op of the waiting thread is half-written
                logging.shutdown()
                os._exit(1)

    return end_task


def watch(number: int, end_task) -> None:
    """Rank 0's trainer runs, maybe waiting in a collective for a rank whose trainer raised: that rank's
    failure is the trial's (the trainer's). Rank 0's own trainer may raise too (a bug on every rank): then
    rank 0 tells its own reason and the task goes on."""
    while LEADER.training == number and not LEADER.failed(number):
        time.sleep(WATCH_S)
    deadline = time.monotonic() + LOST_RANK_WAIT_S
    while LEADER.training == number and time.monotonic() < deadline:
        time.sleep(POLL_S * 5)
    with LEADER.lock:
        if LEADER.training != number:
            return
        LEADER.ending = LEADER.ends_task = True
    failed = LEADER.failed(number)[0]
    reason = failed.read_text() or f"the trainer raised on {failed.stem.rpartition('.')[2]}"
    log.error("trial %d: %s; rank 0 still waits for it: the trial fails and this task ends", number, reason)
    end_task(reason)


def rank_lost(handle) -> bool:
    """The trainer raised on rank 0: whether a rank died (then the trial is no trainer's failure).

    Where the others did not raise too, they may wait for rank 0 in a collective: the task runs no more
    trials, and rank 0's non-zero exit ends them (srun --kill-on-bad-exit=1).
    """
    if LEADER is None:
        return False
    deadline = time.monotonic() + LOST_RANK_WAIT_S
    while time.monotonic() < deadline:
        if handle.stop.received == "SIGTERM":  # srun ends the step of a rank that died
            log.error("trial %d: another rank died; it is retried as a dead worker's trial", handle.number)
            LEADER.ends_task = True
            return True
        if LEADER.followers_failed(handle.number):
            return False  # every rank raised: the trainer's own failure, and every rank is ready for the next
        time.sleep(0.1)
    log.error("trial %d raised on rank 0, not on every rank: the others may wait for it; this task ends", handle.number)
    LEADER.ends_task = True
    return False


# ---------------------------------------------------------------- the other ranks
class FollowerHandle:
    """The trainer's handle on ranks other than 0: the same calls; rank 0 writes, every rank acts alike."""

    def __init__(self, number: int, folder: Path, verdicts: Verdicts, trusted: bool) -> None:
        self.number, self.folder, self.verdicts, self.trusted = number, folder, verdicts, trusted
        self.checkpoint = folder / "checkpoint.pt"

    def report(self, value: float, step: int) -> None:
        self.follow(f"step {step}")

    def save_checkpoint(self, state) -> None:
        self.follow("its checkpoint")

    def follow(self, where: str) -> None:
        verdict = self.verdicts.next()
        if verdict == PRUNED:
            log.info("trial %d pruned at %s (rank 0's decision)", self.number, where)
            raise optuna.TrialPruned(f"pruned at {where}")
        if verdict:
            log.info("trial %d stops at %s after %s (rank 0's decision)", self.number, where, verdict)
            raise Interrupted(verdict)

    def load_checkpoint(self):
        if not self.checkpoint.exists():
            return None
        log.info("trial %d resumes from %s", self.number, self.checkpoint)
        return load_state(self.checkpoint, self.trusted)

    def save_weights(self, state) -> None:
        """Rank 0 saves the weights."""


def follow(config) -> int:
    """Run the trials rank 0 runs, until it says this task runs no more; the worker's exit status."""
    global log
    log = logging.getLogger(f"rank{rank()}")
    folder = channel(config)
    try:
        seen = 0
        while True:
            news = wait_for_news(folder, seen)
            if news.get("done"):
                return 0
            seen = news["seq"]
            os.environ["MASTER_PORT"] = str(news["port"])  # rank 0's torch listens there
            ended = follow_trial(config, news, folder)
            if ended is not None:
                return ended
    except LauncherGone as e:
        log.error("the --local launcher (pid %s) is gone: this rank ends", e)
        return 1
    finally:
        with contextlib.suppress(OSError):
            (folder / f"rank{rank()}.left").write_text("")


def wait_for_news(folder: Path, seen: int) -> dict:
    sleeps = pauses()
    while True:
        try:
            news = json.loads((folder / "trial.json").read_text())
            if news["seq"] > seen:
                return news
        except (OSError, ValueError):
            pass  # rank 0 has not written it yet
        check_launcher()
        time.sleep(next(sleeps))


def trial_code(config, number: int):
    """What rank 0 runs for this trial: the resolved config.yaml it wrote in the trial's folder (of the config
    version the trial is pinned to) and the trainer or objective that names, found as rank 0 finds it."""
    resolved = Config(
        yaml.safe_load((checkpoints.trial_folder(config, number) / "config.yaml").read_text()), config.path
    )
    kind = code_key(resolved)
    return resolved, kind, load_function(resolved, kind, config.path)[0]


def follow_trial(config, news: dict, ranks_folder: Path) -> int | None:
    """One trial on this rank; an exit status when this rank must end, None to wait for the next trial."""
    number = int(news["trial"])
    folder = checkpoints.trial_folder(config, number)  # rank 0 wrote its config.yaml and checkpoint there
    verdicts = Verdicts(ranks_folder / f"{number}.jsonl")
    log.info("trial %d: training with rank 0 (config version %s)", number, news.get("version"))
    try:
        resolved, kind, function = trial_code(config, number)
        if kind == "objective":
            trial_control.Running.folder, trial_control.Running.agree = folder, verdicts.agree
            function(None)  # optuna-integration's TorchDistributedTrial(None) gets everything from rank 0
        else:
            trusted = resolved["study"]["trusted_checkpoints"]
            function(dict(resolved), FollowerHandle(number, folder, verdicts, trusted))
    except (optuna.TrialPruned, TrialOver):
        return None
    except Interrupted:
        return 0  # rank 0 requeues the task or leaves the trial for the next one
    except Exception as e:
        log.exception("trial %d failed on rank %d", number, rank())
        (ranks_folder / f"{number}.rank{rank()}.failed").write_text(f"rank {rank()}: {type(e).__name__}: {e}")
        return wait_for_end(verdicts, number)
    finally:
        trial_control.Running.folder = trial_control.Running.agree = None
    return None


def wait_for_end(verdicts: Verdicts, number: int) -> int | None:
    """This rank's trainer raised: rank 0 ends the trial too (the same bug), or is stuck without this rank."""
    deadline = time.monotonic() + FOLLOWER_WAIT_S
    while time.monotonic() < deadline:
        try:
            verdicts.next(timeout=deadline - time.monotonic())
        except TrialOver:
            return None
        except TimeoutError:
            break
    log.error("trial %d: rank 0 did not end the trial in %d s: this task ends", number, FOLLOWER_WAIT_S)
    return 1
