"""The study's journal file: open it, seal torn lines, read it tolerantly, snapshot it, check and repair it.

Optuna's JournalFileBackend appends one JSON op per line, under a lock file. A writer interrupted
mid-append (full disk, exceeded quota, node crash) leaves a torn line without its newline; Optuna's
next writer glues its op onto it, and from then on Optuna's reader raises JSONDecodeError on every
load (optuna#5138): the study is dead. Here:

- Appending: under the lock, a torn last line is first sealed with a newline, so every op gets a
  line of its own. The journal is only appended to, but for a repair: every live reader keeps byte
  offsets into it.
- Reading: a line that holds no op (a sealed torn op, garbage) is skipped with a warning naming its
  line and byte offset; a whole op glued onto a torn one (written by a plain Optuna writer) is
  recovered. An unterminated last line is an append in progress, or a torn one not sealed yet:
  it is read once it has its newline.
- Locking: Optuna's lock file; with JOURNAL_LOCK=queued, a queue in front of it (a fcntl lock), so
  that hundreds of writers do not poll it (journal_lock.py). The flush to disk comes after the lock.
- Loading: a snapshot of Optuna's replayed study (journal.log.snapshot, BaseJournalSnapshot) is
  restored, once it proves to be this user's and to match the journal (journal_snapshot.py), and
  only the ops after it are parsed.
- Checking and repairing: scan() lists the bad lines, journal_lock.stale_lock() a lock left by a dead process;
  rewrite() drops the bad lines so that Optuna's own strict reader reads the study again, after
  backup(). It rewrites only while no other process has the study open: each holds a shared lock
  on journal.log.readers from open_journal() until close() or its exit, and rewrite() needs it
  alone (StudyInUse otherwise). The caller also checks that no worker lives, since a filesystem
  may not show the lock: one without fcntl locks (NFS `nolock`, Lustre `noflock`) says so once;
  one that keeps them per node (Lustre `localflock`, NFS `local_lock`) hides the other nodes'
  processes without an error (journal_readers.py). There the repair rewrites once the caller's
  checks pass, and a process that still has the study open follows the rewrite:
- Following a rewrite: the rewrite bumps a generation number in journal.log.readers. A reader
  compares it and the journal's inode on every read; if either changed, it forgets its byte offsets
  and reads the new file from its start, and a snapshot records both, so that none is saved from,
  or trusted for, another file (JournalFile._follow_rewrite). A journal replaced by a file that does
  not continue the ops it has read stops the process with one line (JournalReplaced).

Ops are numbered by their order in the file, bad lines not counted, so every process (and a later
BaseJournalSnapshot, which stores the number of ops it has applied) agrees on the numbering, before
and after a rewrite. Optuna's private classes come through optuna_internals.py.
"""

import atexit
import json
import logging
import os
import shutil
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

from parallel_optuna.storage import optuna_internals
from parallel_optuna.storage.journal_lock import default_lock
from parallel_optuna.storage.journal_readers import NO_FCNTL, Readers, StudyInUse  # noqa: F401  (rewrite() raises it to its callers)
from parallel_optuna.storage.journal_snapshot import Snapshot
from parallel_optuna.storage.optuna_internals import (
    BaseJournalSnapshot,
    JournalOperation,
    get_lock_file,
)

log = logging.getLogger("journal")
OP_START = b'{"op_code":'  # how Optuna's JournalStorage serializes every op
# Caches derived from the journal (a snapshot of its replay, say) sit beside it and match this
# pattern; a rewrite deletes them, since they count ops and bytes of the old file.
CACHE_PATTERN = "{name}.snapshot*"
# A load that replayed this many ops past its snapshot (about 100 trials of ~23 ops) writes a new one.
REFRESH_OPS = 2500
BACKUP_PATTERN = "{name}.bak-{stamp}"
# Ops of a trial still running: a new trial, its params, reports and attributes. They reach the disk
# with the next op that is flushed (a trial's end, anyone's), or when the process exits, not each on
# its own: what only a crash of the machine holding them in its page cache could lose is a running
# trial's state, and that crash kills the trial's worker too (on NFS, close() already sends every op
# to the server). A trial's end (its result), a change to the study, and a trial created in another
# state than RUNNING (a retry or an enqueued config WAITING, a repeat answered COMPLETE) are flushed
# before Optuna goes on.
FLUSHED_LATER = {
    JournalOperation.CREATE_TRIAL,
    JournalOperation.SET_TRIAL_PARAM,
    JournalOperation.SET_TRIAL_INTERMEDIATE_VALUE,
    JournalOperation.SET_TRIAL_USER_ATTR,
    JournalOperation.SET_TRIAL_SYSTEM_ATTR,
}
_unflushed = set()  # journals this process appended to since their last flush


@atexit.register
def _flush_on_exit():
    for path in list(_unflushed):
        try:
            _fsync(path)
        except OSError:
            pass  # gone (a temporary study) or unwritable: nothing left to keep


def _fsync(path):
    # Outside the lock: a flush to disk takes ~5 ms, the append itself far less, and writers
    # flushing at once share one flush of the disk. It covers every op appended before it.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    _unflushed.discard(path)


UNTERMINATED = "unterminated last line (an append in progress, or a torn one that the next append seals)"


@dataclass(frozen=True)
class Entry:
    """One line of the journal: its op (or None), and what is wrong with it (or "")."""

    line: int  # 1-based
    offset: int  # byte offset of the line
    size: int  # bytes, newline included
    op: dict | None
    op_bytes: bytes  # the op's own bytes: the whole line, or the op glued onto a torn one
    problem: str = ""


def decode(line):
    """(op, its bytes, problem) for one line: a whole op, an op glued onto a torn one, or nothing."""
    text = line.rstrip(b"\n")
    op = _op(text)
    if op is not None:
        return op, text, ""
    start = text.find(OP_START, 1)
    while start > 0:  # the torn op is lost; a whole op written after it is not
        op = _op(text[start:])
        if op is not None:
            return op, text[start:], "a torn op with a whole op glued on: the torn op is lost, the glued one is read"
        start = text.find(OP_START, start + 1)
    return None, b"", "not a whole op (a torn append: full disk, quota or crash): skipped, that op is lost"


def _op(text):
    try:
        op = json.loads(text)
    except ValueError:  # JSONDecodeError, or bytes that are no UTF-8
        return None
    return op if isinstance(op, dict) and "op_code" in op else None


def entries(f, offset=0, line=1, tail=False):
    """The journal's lines from (offset, line) on. Without tail, an unterminated last line is left out."""
    f.seek(offset)
    for raw in f:
        if not raw.endswith(b"\n") and not tail:
            return  # an append in progress, or a torn one that the next append seals
        op, op_bytes, problem = decode(raw)
        if not raw.endswith(b"\n"):
            problem = UNTERMINATED
        yield Entry(line, offset, len(raw), op, op_bytes, problem)
        offset, line = offset + len(raw), line + 1


class JournalFile(JournalFileBackend, BaseJournalSnapshot):
    """Optuna's journal file backend that seals torn lines before appending, skips bad lines, and keeps
    a snapshot of the replayed study beside the journal, so that a load replays only the ops after it."""

    def __init__(self, path, lock=None):
        super().__init__(str(path), lock_obj=lock or default_lock(str(path)))
        self.readers = Readers(path)  # this process has the study open: a repair does not rewrite it
        self._release = weakref.finalize(self, self.readers.close)
        # op number -> (byte offset, line) where reading the next op starts: where each read ended,
        # and where a restored snapshot ends. Not one entry per op: a 100k-trial study has millions.
        self._positions = {0: (0, 1)}
        self._end = (0, 0, 1)  # (ops, offset, line) after the last op handed to Optuna
        self._identity = None  # (inode, repair generation) of the file those offsets point into
        self._last = (0, b"")  # (number, bytes) of the last op handed to Optuna
        self._expect = (0, b"")  # the op a reread of a rewritten journal must find at that number
        self._warned = set()
        self.snapshot = Snapshot(Path(path), self.readers.generation)
        self.restored = 0  # ops covered by the snapshot this process started from

    def close(self):
        """This storage no longer has the study open; a repair rewrites the journal once no process has."""
        self._release()

    def __getstate__(self):
        # A storage sent to another process (Optuna pickles it for one) holds the lock there, not a copy of ours.
        return {k: v for k, v in self.__dict__.items() if k not in ("readers", "_release")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.readers = Readers(self._file_path)
        self._release = weakref.finalize(self, self.readers.close)

    def read_logs(self, log_number_from):
        with open(self._file_path, "rb") as f:
            self._follow_rewrite(f)
            # Where the last read stopped, even if Optuna stopped consuming it midway (an apply that raised).
            self._positions[self._end[0]] = self._end[1:]
            number = log_number_from if log_number_from in self._positions else 0
            offset, line = self._positions[number]
            for entry in entries(f, offset, line):
                if entry.problem and entry.offset not in self._warned:
                    self._warned.add(entry.offset)
                    log.warning("%s: line %d (byte %d): %s", self._file_path, entry.line, entry.offset, entry.problem)
                offset, line = entry.offset + entry.size, entry.line + 1
                if entry.op is not None:
                    number += 1
                    if number == self._expect[0]:
                        self._check_continues(entry.op_bytes)
                    if number > log_number_from:
                        self._end = (number, offset, line)  # Optuna counts an op as read once it has it
                        self._last = (number, entry.op_bytes)
                        yield entry.op
        if number < self._expect[0]:
            self._check_continues(b"")  # fewer ops than this process has read: not a rewrite of its journal
        if number >= self._end[0]:
            self._end = (number, offset, line)  # bad lines after the last op: not read again

    def _follow_rewrite(self, f):
        """A journal rewritten by a repair since the last read: forget every byte offset, read it again from its start.

        The rewrite keeps every op in its order, so the ops keep their numbers and Optuna's replay goes on
        from the same op; the op read last must come back at its number (_check_continues).
        """
        identity = (os.fstat(f.fileno()).st_ino, self.readers.generation())
        if self._identity is not None and identity != self._identity:
            log.warning(
                "%s: rewritten by a repair since this process read it: read again from the start", self._file_path
            )
            self._positions, self._end, self._expect = {0: (0, 1)}, (0, 0, 1), self._last
        self._identity = identity

    def _check_continues(self, op_bytes):
        if op_bytes != self._expect[1]:
            raise JournalReplaced(
                f"error: {self._file_path}: replaced by a file that does not continue the journal this process "
                "read (not by a repair): start the command again"
            )
        self._expect = (0, b"")

    def append_logs(self, logs):
        data = b"".join(json.dumps(op, separators=(",", ":")).encode() + b"\n" for op in logs)
        try:
            with get_lock_file(self._lock):
                self._append(data)
            _unflushed.add(self._file_path)
            if self.flush_now(logs):
                _fsync(self._file_path)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self._file_path) from e  # name the file in the error

    def flush_now(self, logs):
        """Whether these ops must be on disk before Optuna goes on (FLUSHED_LATER: the ones that need not)."""
        return any(op.get("op_code") not in FLUSHED_LATER or _created_finished_or_waiting(op) for op in logs)

    def _append(self, data):
        fd = os.open(self._file_path, os.O_RDWR | os.O_APPEND)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # Sealed, the torn line is skipped by every reader; unsealed, our op would be lost with it.
                log.warning("%s: sealed a torn line at byte %d (an interrupted append)", self._file_path, size)
                data = b"\n" + data
            _write_all(fd, data)
        finally:
            # Before the lock goes: on NFS, close sends the bytes to the server (close-to-open consistency),
            # so the next holder appends after them; it also reports delayed write errors.
            os.close(fd)

    def save_snapshot(self, snapshot):
        # Optuna pickles its replay result right after reading the journal to its end, under its thread
        # lock: the pickle covers exactly the ops of our last read.
        self.snapshot.save(snapshot, *self._end, identity=self._identity)

    def load_snapshot(self):
        found = self.snapshot.load()
        if found is None:
            return None
        (ops, offset, line), self._identity, payload = found
        self._positions[ops] = (offset, line)  # the replay goes on from there without parsing a line before it
        self.restored = ops
        return payload


class JournalReplaced(SystemExit):
    """The journal was swapped for a file that does not go on from the ops this process has read: it stops
    with one line rather than mix two studies (a rewrite by a repair keeps the ops, and is followed)."""


def _created_finished_or_waiting(op):
    running = optuna.trial.TrialState.RUNNING
    return op.get("op_code") == JournalOperation.CREATE_TRIAL and op.get("state", running) != running


def _write_all(fd, data):
    while data:  # a full disk may take part of it, then fail
        data = data[os.write(fd, data) :]


def open_journal(path):
    """The study storage for a journal file, as every part of the project (and the tests) opens it.

    A load that had to replay many ops (no snapshot yet, a stale or rejected one) leaves a fresh snapshot
    for the next: Optuna itself saves one only when a process creates every 100th trial.
    """
    backend = JournalFile(path)
    storage = optuna.storages.JournalStorage(backend)
    ops = backend._end[0]
    # Only where this process may write one (not in a teammate's run directory), and unless a worker
    # that started meanwhile saved one already.
    behind = ops - backend.restored >= REFRESH_OPS
    if behind and backend.snapshot.writable() and ops - backend.snapshot.covered() >= REFRESH_OPS:
        save_snapshot(storage)
    return storage


def close(storage):
    """Let go of a storage from open_journal: this process no longer has the study open (for a repair)."""
    optuna_internals.journal_backend(storage).close()


def save_snapshot(storage):
    """Save the journal storage's replayed state as its snapshot now (as Optuna does every 100 trials)."""
    optuna_internals.save_journal_snapshot(storage)


# ---------------------------------------------------------------- check and repair
def scan(path):
    """(number of ops, [entries with a problem]) of the journal file, its unterminated last line included."""
    with open(path, "rb") as f:
        every = list(entries(f, tail=True))
    return sum(e.op is not None for e in every), [e for e in every if e.problem]


def backup(path):
    """A copy of the journal beside it, before anything changes; returns its path."""
    target = Path(BACKUP_PATTERN.format(name=path, stamp=time.strftime("%Y%m%d-%H%M%S")))
    shutil.copy2(path, target)
    return target


def rewrite(path):
    """Keep only the ops, one per line, in their order; then drop the caches derived from the old file.

    Only while no other process has the study open: their byte offsets point into the old file. Raises
    StudyInUse (nothing changed) if one has; where the filesystem hides them (journal_readers), the
    caller's check of the workers decides, and a process still open reads the new file from its start.
    Returns the number of ops kept.
    """
    path = Path(path)
    readers = Readers(path)
    try:
        with readers.exclusive(), get_lock_file(default_lock(str(path))):  # a stray writer (the optuna CLI) waits
            with open(path, "rb") as f:
                kept = [e.op_bytes + b"\n" for e in entries(f, tail=True) if e.op is not None]
            readers.bump()  # before the new file appears: a reader that opens it sees the new generation
            _replace(path, b"".join(kept))
    finally:
        readers.close()
    for cache in path.parent.glob(CACHE_PATTERN.format(name=path.name)):
        cache.unlink()
    return len(kept)


def _replace(path, data):
    """The journal holds data, whole (never half a journal, even on a full disk), with its permissions."""
    partial = path.with_name(path.name + ".repair")
    partial.unlink(missing_ok=True)  # left by a repair killed mid-write
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, os.stat(path).st_mode & 0o777)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def strict_read(path):
    """How many trials Optuna's own reader, strict about every line, finds in the journal (raises if it cannot)."""
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)]
    return sum(len(optuna.load_study(study_name=n, storage=storage).get_trials(deepcopy=False)) for n in names)
