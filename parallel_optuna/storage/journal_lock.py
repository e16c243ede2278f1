"""The journal's lock: Optuna's lock file, optionally behind a fcntl queue; a stale lock told and broken."""

import errno
import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path

from optuna.storages.journal import JournalFileOpenLock

from parallel_optuna.storage.journal_readers import NO_FCNTL, Readers, StudyInUse  # noqa: F401  (rewrite() raises it to its callers)
from parallel_optuna.storage.optuna_internals import (
    LOCK_FILE_SUFFIX,
    BaseJournalFileLock,
)

log = logging.getLogger("journal")
LOCK_GRACE_S = 30  # Optuna's lock grace: a lock file unchanged this long is broken by the waiters
MAX_CLOCK_SKEW_S = 120  # how far a file server's clock may be from ours: mtimes younger than this are watched
QUEUE_SUFFIX = ".flock"  # the file that journal writers take a fcntl lock on, in turn
HOLDER_MARK = "journal-lock"  # a lock file a JournalLock created says "<mark> <host> <pid> <process start>"


class JournalLock(BaseJournalFileLock):
    """Optuna's open lock (`journal.log.lock`, O_EXCL), with a queue in front of it: a kernel lock.

    Alone, Optuna's open lock is polled with a backoff that grows to 1 s and has no order: with
    hundreds of workers the unlucky ones wait many seconds. Here a writer first takes a POSIX fcntl
    lock on `journal.log.flock`, for which the kernel makes the waiters sleep and wakes one when it
    is released, and only then creates the lock file, which is then almost always free. The lock
    file still decides: so writers that only know it (Optuna's CLI, a filesystem without fcntl locks,
    or one where they are local to a node) are excluded as before. A fcntl lock dies with its process;
    the lock file a killed holder leaves names it, and the next writer in the queue on that host
    breaks it at once instead of waiting Optuna's 30 s grace. A holder that is alive but stopped
    (`scontrol suspend`) keeps its fcntl lock: its waiters leave the queue once its lock file has not
    changed for the grace, and Optuna's own grace then breaks that file.
    """

    warned = False  # say once per process that the filesystem has no fcntl locks

    def __init__(self, path):
        self._open_lock = JournalFileOpenLock(path)
        self._lock_file = path + LOCK_FILE_SUFFIX
        self._queue_file = path + QUEUE_SUFFIX
        self._fd = None

    def acquire(self):
        self._fd = self._queue()
        try:
            if self._fd is not None:
                self._break_dead_holder()
            if not self._create():
                self._open_lock.acquire()  # held by a writer outside the queue: Optuna's polling and grace
        except BaseException:
            self._leave_queue()
            raise
        return True

    def release(self):
        try:
            self._open_lock.release()
        finally:
            self._leave_queue()

    def _queue(self):
        """A descriptor holding the fcntl lock; None where the filesystem has none (NFS nolock, Lustre noflock),
        or where the writer ahead makes no progress for Optuna's grace (stopped by `scontrol suspend`, say)."""
        try:
            fd = os.open(self._queue_file, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            return None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):  # held: wait our turn
                return fd if self._wait_in_queue(fd) else None
            os.close(fd)
            if e.errno not in NO_FCNTL:
                raise
            if not JournalLock.warned:
                JournalLock.warned = True
                log.warning("%s: no fcntl locks here (%s): appends wait on the lock file alone", self._queue_file, e)
            return None

    def _wait_in_queue(self, fd):
        """Sleep in the kernel until the queue's lock is ours (True), or leave the queue (False) once the lock
        file has stayed the same for Optuna's grace: its holder is stopped, and Optuna's grace decides."""
        turn, state = threading.Event(), {"left": False, "error": None}
        guard = threading.Lock()

        def wait():
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)  # cannot be interrupted: a thread, so the caller can stop waiting
            except OSError as e:
                state["error"] = e
            with guard:
                if state["left"]:
                    os.close(fd)  # our turn came too late: pass it on
                turn.set()

        threading.Thread(target=wait, name="journal-queue", daemon=True).start()
        seen, since = self._lock_file_state(), time.monotonic()
        while not turn.wait(0.2):
            now = self._lock_file_state()
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since > LOCK_GRACE_S:
                with guard:
                    if not turn.is_set():
                        state["left"] = True
                        log.warning(
                            "%s: the writer ahead made no progress in %d s: left the queue",
                            self._queue_file,
                            LOCK_GRACE_S,
                        )
                        return False
        if state["error"] is not None:
            os.close(fd)
            raise state["error"]
        return True

    def _lock_file_state(self):
        try:
            status = os.stat(self._lock_file)
        except OSError:
            return None
        return status.st_ino, status.st_mtime_ns

    def _leave_queue(self):
        if self._fd is not None:
            os.close(self._fd)  # closing it releases the fcntl lock
            self._fd = None

    def _create(self):
        try:
            fd = os.open(self._lock_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, f"{HOLDER_MARK} {socket.gethostname()} {os.getpid()} {_started(os.getpid())}\n".encode())
        except OSError:
            pass  # a full disk: the lock is ours all the same, only a death would then cost Optuna's grace
        finally:
            os.close(fd)
        return True

    def _break_dead_holder(self):
        """In the queue's front, a lock file of a queued writer can only be left by a dead one: break it.

        Only on the holder's own host, where its pid can be checked; else Optuna's grace decides.
        """
        try:
            with open(self._lock_file, "rb") as f:  # Optuna's symlink lock points at the journal: read little
                mark, host, pid, started = (f.read(256).decode().split() + ["", "", "", ""])[:4]
        except (OSError, UnicodeDecodeError):
            return
        if mark != HOLDER_MARK or host != socket.gethostname() or not pid.isdigit() or _started(int(pid)) == started:
            return
        log.warning("%s: its holder (pid %s) died holding it: removed", self._lock_file, pid)
        break_lock(self._journal())

    def _journal(self):
        return self._lock_file[: -len(LOCK_FILE_SUFFIX)]


def default_lock(path):
    """Optuna's open lock; JOURNAL_LOCK=queued puts the fcntl queue in front of it (JournalLock).

    Not the default: on the 2-core development machine, with 256 workers sharing two cores, a lock
    handed to a sleeping waiter waits for that waiter to be scheduled, and the queue did worse than
    Optuna's polling (bench/README.md). Mixing both in one study is safe: the lock file decides.
    """
    return JournalLock(path) if os.environ.get("JOURNAL_LOCK") == "queued" else JournalFileOpenLock(path)


def _started(pid):
    """The process's start time in clock ticks ("" if gone or a zombie), so a reused pid is told apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return ""
    return "" if not fields or fields[0] == "Z" else fields[19]


def lock_path(path):
    return Path(str(path) + LOCK_FILE_SUFFIX)


def stale_lock(path, watch=LOCK_GRACE_S):
    """Seconds a lock file has been seen held by nobody who lets it go (its holder died mid-append), else None.

    Its mtime comes from the file server's clock, which may be ahead of or behind ours: a lock whose mtime
    looks older than the grace by more than any clock skew is stale; any other is watched on this machine's
    monotonic clock, and is stale only if the same file stays for `watch` seconds (an append takes
    milliseconds).
    """
    lock, started = lock_path(path), time.monotonic()
    try:
        first = lock.stat()
    except FileNotFoundError:
        return None
    if time.time() - first.st_mtime > LOCK_GRACE_S + MAX_CLOCK_SKEW_S:
        return time.time() - first.st_mtime
    while time.monotonic() - started < watch:
        time.sleep(0.2)
        try:
            now = lock.stat()
        except FileNotFoundError:
            return None
        if (now.st_ino, now.st_mtime_ns) != (first.st_ino, first.st_mtime_ns):
            return None  # released and taken again: its holders are alive
    return time.monotonic() - started


def break_lock(path):
    """Remove the lock file the way Optuna's waiters do after the grace (rename, then unlink)."""
    try:
        JournalFileOpenLock(str(path)).release()
    except RuntimeError:
        pass  # somebody else removed it first
