"""Who has the study open, and which repair of the journal they read: `journal.log.readers`.

Every process that opens the study through journal.open_journal (a worker, between its trials too;
a `--local` run; `--status`, `--export_best`, `--report`; `make dashboard`; the `--as_job` submitter)
holds a shared POSIX lock (lockf) on this file beside the journal for as long as its storage is open.
A repair rewrites the journal only if it gets the lock exclusively, without waiting (exclusive(): it
raises StudyInUse otherwise). A process that opens the study meanwhile waits for the rewrite to end.

The file also holds the journal's generation, which a rewrite bumps before it replaces the journal.
A reader keeps byte offsets into the journal; on every read it compares the generation and the
journal's inode with those of the file it read before, and reads a rewritten journal again from its
start (journal.JournalFile). A snapshot records both, and is trusted only by the same file.

Where the lock is not real, the generation still protects the readers:
- a filesystem without fcntl locks (NFS mounted `nolock`, Lustre `noflock`: ENOLCK, ENOSYS...)
  is named in one warning; the repair cannot see who has the study open, and rewrites the journal
  when the other checks pass (no live worker in the trials, no task of the study in squeue);
- Lustre mounted `localflock` (or NFS `local_lock=all`) grants locks that only its own node sees,
  without an error: a process on another node is invisible to the repair in the same way.
In both cases a process that still has the study open notices the rewrite on its next read.

One descriptor per file and process, kept while any storage of the process has the journal open:
a POSIX lock belongs to the process, and closing any descriptor of the file would drop it.
"""

import contextlib
import errno
import fcntl
import logging
import os
import threading

log = logging.getLogger("journal")
SUFFIX = ".readers"
# fcntl lock errors that mean "not on this filesystem" (a lost lock server is ENOLCK too).
NO_FCNTL = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF}
GENERATION_WIDTH = 20  # digits, written in place: a shorter number never leaves digits of a longer one
_held = {}  # real path of a readers file -> [descriptor or None, writable, storages of this process using it]
_guard = threading.Lock()


class StudyInUse(Exception):
    """A repair may not rewrite the journal: another process has the study open."""


class Readers:
    """This process's share of `journal.log.readers`: held from creation until close()."""

    warned = False  # say once per process that the filesystem has no fcntl locks

    def __init__(self, journal_path):
        self.path = os.path.realpath(str(journal_path) + SUFFIX)
        self._closed = False
        with _guard:
            if self.path not in _held:
                _held[self.path] = [*_open_shared(self.path), 0]
            _held[self.path][2] += 1

    def close(self):
        """This storage no longer has the study open; the lock goes with the process's last one."""
        with _guard:
            if self._closed:
                return
            self._closed = True
            entry = _held[self.path]
            entry[2] -= 1
            if entry[2] == 0:
                del _held[self.path]
                if entry[0] is not None:
                    os.close(entry[0])

    def generation(self):
        return generation_of(self.path[: -len(SUFFIX)])

    @contextlib.contextmanager
    def exclusive(self):
        """The lock held by this process alone while the block runs (then shared again); else StudyInUse."""
        fd, writable, _ = _held[self.path]
        if fd is not None and not writable:
            raise StudyInUse(f"{self.path} is not writable for this user: only the study's owner can rewrite it")
        locked = fd is not None and _try_exclusive(fd, self.path)
        try:
            yield
        finally:
            if locked:
                fcntl.lockf(fd, fcntl.LOCK_SH)  # this process's storages still have the study open

    def bump(self):
        """Count one more rewrite, before the journal is replaced: every reader then reads it again."""
        fd = _held[self.path][0]
        if fd is None:
            return
        number = f"{self.generation() + 1:0{GENERATION_WIDTH}d}\n".encode()
        os.pwrite(fd, number, 0)
        os.fsync(fd)  # on NFS, so that readers on other nodes see it


def _open_shared(path):
    """(descriptor holding a shared lock, writable); (None, False) where the file cannot be opened."""
    # Readable by the group where the run directory is (--group_access): a teammate's status holds it too.
    group = os.stat(os.path.dirname(path)).st_mode & 0o040
    writable = True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600 | group)
    except OSError:
        writable = False
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)  # a teammate: reading is enough for a shared lock
        except OSError:
            return None, False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)  # waits only while a repair rewrites the journal
    except OSError as e:
        if e.errno not in NO_FCNTL:
            os.close(fd)
            raise
        _no_locks(path, e)
    return fd, writable


def _try_exclusive(fd, path):
    """True once the lock is this process's alone; False where the filesystem has no fcntl locks."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            why = "a process still has the study open (a worker, --local, status, export or the dashboard)"
            raise StudyInUse(why) from None
        if e.errno not in NO_FCNTL:
            raise
        _no_locks(path, e)
        return False
    return True


def _no_locks(path, error):
    if not Readers.warned:
        Readers.warned = True
        log.warning(
            "%s: this filesystem has no fcntl locks (%s): a repair cannot see which processes have the study open; "
            "they read the journal again after a rewrite",
            path,
            error,
        )


def generation_of(journal_path):
    """How many times the journal was rewritten by a repair (0: never, or the file cannot be read)."""
    path = os.path.realpath(str(journal_path) + SUFFIX)
    entry = _held.get(path)
    try:
        if entry and entry[0] is not None:
            data = os.pread(entry[0], GENERATION_WIDTH + 1, 0)
        else:  # no lock of this process on it: opening and closing it drops none
            with open(path, "rb") as f:
                data = f.read(GENERATION_WIDTH + 1)
    except OSError:
        return 0
    return int(data) if data.strip().isdigit() else 0
