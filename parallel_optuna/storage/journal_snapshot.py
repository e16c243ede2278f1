"""`journal.log.snapshot`: a pickle of Optuna's replayed study, which journal bytes it covers, and who wrote it.

Unpickling runs code, and a run directory can be writable by others (a group-writable project
folder, a teammate's account): a snapshot is only a cache, and the journal decides. So a snapshot is
trusted only when all of these hold, and otherwise ignored with one warning (the whole journal is
replayed, and the snapshot rebuilt by the run directory's owner):

- it is a regular file owned by this user, opened without following a link (O_NOFOLLOW) and checked
  on the opened file (fstat), so that nothing can be swapped in between the check and the read;
- its first line carries an HMAC-SHA256 of its metadata, under a key only this user can read
  (key_path(): `$XDG_CONFIG_HOME/parallel-optuna/snapshot.key`, else `~/.config/...`; 0600 in a
  0700 folder, made on first use). The metadata holds the pickle's SHA-256: the signature and the
  digest are checked before anything is parsed or unpickled;
- it has applied at least one op (one at offset 0 would match any journal);
- it matches the journal: the inode and repair generation (journal_readers) of the file its ops were
  read from, a digest of the journal's first bytes and of those just before the snapshot's offset,
  and the Optuna version.

A teammate's process (another uid, without the owner's key) replays the journal, says so in one line,
and never writes a snapshot into a run directory it does not own.
"""

import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import uuid
from pathlib import Path

import optuna

from parallel_optuna.storage import journal_readers

log = logging.getLogger("journal")
SNAPSHOT_FORMAT = 2
# The journal bytes a snapshot vouches for: the first ones (the study's creation, with a random worker
# id) and the last before its offset. A rewrite or another journal changes them; reading them is cheap.
FINGERPRINT_BYTES = 4096
KEY_FOLDER = "parallel-optuna"
KEY_FILE = "snapshot.key"
HEAD_LIMIT = 65536  # a snapshot's first line is well under 1 KiB: a planted file without newlines is not read whole
_keys = {}  # key path -> this user's key (bytes), or why there is none (str); read once per process


def key_path():
    """Where this user's snapshot key lives ($XDG_CONFIG_HOME if set and absolute, else ~/.config)."""
    config = os.environ.get("XDG_CONFIG_HOME", "")
    base = Path(config) if os.path.isabs(config) else Path.home() / ".config"
    return base / KEY_FOLDER / KEY_FILE


def snapshot_key():
    """This user's key (bytes), made on first use; or why there is none (str), said once per process."""
    path = key_path()
    if path not in _keys:
        try:
            _keys[path] = _read_key(path)
        except FileNotFoundError:
            _keys[path] = _make_key(path)
        except OSError as e:
            _keys[path] = f"{path}: {e.strerror}"
        if isinstance(_keys[path], str):
            log.warning("no snapshot key (%s): loads replay the whole journal", _keys[path])
    return _keys[path]


def _read_key(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o077 or not stat.S_ISREG(st.st_mode):
            return f"{path}: must be a file of this user that only this user can read (chmod 600)"
        text = os.read(fd, 256).strip()
    finally:
        os.close(fd)
    return bytes.fromhex(text.decode()) if len(text) == 64 else f"{path}: not a key written by this tool"


def _make_key(path):
    """A new random key, written whole under a name of its own and linked into place: a concurrent
    first use never reads half a key, and the first link wins."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder = os.stat(path.parent)
        if folder.st_uid != os.geteuid() or folder.st_mode & 0o022:
            return f"{path.parent}: must be a folder of this user that only this user can write (chmod 700)"
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
            os.link(partial, path)
        except FileExistsError:
            pass  # another process of this user made it first: use theirs
        finally:
            partial.unlink(missing_ok=True)
        return _read_key(path)
    except OSError as e:
        return f"{path}: {e.strerror}"


def _signature(key, text):
    return hmac.new(key, text, hashlib.sha256).hexdigest().encode()


class Snapshot:
    """The snapshot beside a journal: save() after a read, load() before the first one, covered() to compare.

    One line `<HMAC> <metadata JSON>`, then the pickle. The metadata says how many ops the pickle has
    applied, the byte offset and line where they end, which file they were read from (inode, repair
    generation), digests of the journal's bytes there and of the pickle, and the Optuna version. One
    that is merely behind is extended by the ops after it.
    """

    def __init__(self, journal_path, generation=None):
        self.journal = Path(journal_path)
        self.path = self.journal.with_name(self.journal.name + ".snapshot")
        self.generation = generation or (lambda: journal_readers.generation_of(self.journal))
        self.rejected = False  # this process found it unusable: the next save replaces it

    def writable(self):
        """Whether this process writes snapshots here: only the run directory's owner does."""
        try:
            return os.stat(self.path.parent).st_uid == os.geteuid()
        except OSError:
            return False

    def save(self, payload, ops, offset, line, identity=None):
        """Save the pickle of a replay of `ops` ops, read from the journal file `identity` (inode, generation)."""
        if ops < 1 or not self.writable() or isinstance(snapshot_key(), str) or ops <= self.covered():
            return  # nothing to save, not ours to write, or a concurrent worker saved one at least as recent
        where = self._journal_at(offset)
        if where is None or (identity is not None and where[:2] != identity):
            log.warning("%s: not saved: the journal was rewritten since this process read it", self.path)
            return
        meta = {
            "format": SNAPSHOT_FORMAT,
            "optuna": optuna.__version__,
            "ops": ops,
            "offset": offset,
            "line": line,
            "inode": where[0],
            "generation": where[1],
            "journal": where[2],
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        text = json.dumps(meta).encode()
        self._write(_signature(snapshot_key(), text) + b" " + text + b"\n", payload)

    def _write(self, head, payload):
        # A unique name per writer, renamed into place: concurrent writers never mix their bytes, and a
        # reader sees a whole snapshot or the one before. Matches journal.CACHE_PATTERN: a repair removes leftovers.
        partial = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.partial")
        try:
            # Readable by the group only where the run directory is (--group_access: 0750); a teammate
            # cannot verify it (the key is the owner's), and nobody but the owner can write it.
            group = os.stat(self.path.parent).st_mode & 0o040
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600 | group)
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                f.write(payload)
            os.replace(partial, self.path)  # no fsync: a snapshot torn by a crash fails its digest
            self.rejected = False
        except (OSError, ValueError) as e:  # a full disk costs the next loads time, never a trial
            log.warning("%s: snapshot not written (%s): loads replay the whole journal", self.path, e)
        finally:
            partial.unlink(missing_ok=True)

    def covered(self):
        """Ops covered by the snapshot on disk if it is trusted and matches the journal (0 otherwise).

        From its first line only: the digest of its pickle is not checked here; a damaged one is
        rejected by the next load, which then saves over it (`rejected`).
        """
        fd, _ = self._open()
        if fd is None:
            return 0
        with os.fdopen(fd, "rb") as f:
            meta = self._meta(f.readline(HEAD_LIMIT))
        return 0 if self.rejected or isinstance(meta, str) else meta["ops"]

    def load(self):
        """((ops, offset, line), (inode, generation), pickle) of a trusted snapshot matching the journal; else None."""
        fd, why = self._open()
        if fd is not None and isinstance(snapshot_key(), str):
            os.close(fd)
            return None  # snapshot_key() said why, once
        if fd is not None:
            with os.fdopen(fd, "rb") as f:
                meta = self._meta(f.readline(HEAD_LIMIT))
                payload = b"" if isinstance(meta, str) else f.read()
            why = meta if isinstance(meta, str) else None
            if not why and hashlib.sha256(payload).hexdigest() != meta["sha256"]:
                why = "its bytes are damaged"
        if why:
            self.rejected = True
            log.warning("%s: ignored, %s: the whole journal is replayed", self.path, why)
        if fd is None or why:
            return None
        return (meta["ops"], meta["offset"], meta["line"]), (meta["inode"], meta["generation"]), payload

    def _open(self):
        """(descriptor, None) of a snapshot file this user owns; (None, why not) or (None, None) if there is none."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a planted FIFO does not block
        except FileNotFoundError:
            return None, None
        except OSError as e:
            return None, "it is a symbolic link" if e.errno == errno.ELOOP else f"it is unreadable ({e.strerror})"
        st = os.fstat(fd)
        why = None if stat.S_ISREG(st.st_mode) else "it is not a regular file"
        if st.st_uid != os.geteuid():
            why = f"it belongs to uid {st.st_uid}, not to this user (uid {os.geteuid()}), who cannot verify it"
        if why:
            os.close(fd)
            return None, why
        return fd, None

    def _meta(self, head):
        """The snapshot's metadata if its signature holds and it matches the journal; else why not."""
        key = snapshot_key()
        tag, _, text = head.rstrip(b"\n").partition(b" ")
        if isinstance(key, str):
            return f"no key to verify it ({key})"
        if not hmac.compare_digest(tag, _signature(key, text)):
            return "its signature does not verify (not written by this user, or damaged)"
        try:
            meta = json.loads(text)
            meta.update(ops=int(meta["ops"]), offset=int(meta["offset"]), line=int(meta["line"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return "not a snapshot of this tool"
        if meta.get("format") != SNAPSHOT_FORMAT or meta.get("optuna") != optuna.__version__:
            return f"written by optuna {meta.get('optuna')} (format {meta.get('format')}), this is {optuna.__version__}"
        if meta["ops"] < 1 or meta["line"] < 2:
            return "it has applied no ops"
        where = self._journal_at(meta["offset"])
        if where != (meta.get("inode"), meta.get("generation"), meta.get("journal")):
            return "it does not match the journal (rewritten by a repair, or replaced)"
        return meta

    def _journal_at(self, offset):
        """(inode, repair generation, digest of the first bytes and of those before offset) of the journal now; None
        if it is shorter or unreadable."""
        try:
            with open(self.journal, "rb") as f:
                st = os.fstat(f.fileno())
                if offset < 0 or st.st_size < offset:
                    return None
                head = f.read(min(offset, FINGERPRINT_BYTES))
                f.seek(max(0, offset - FINGERPRINT_BYTES))
                tail = f.read(offset - f.tell())
        except OSError:
            return None
        digest = hashlib.sha256(head + b"|" + tail + b"|" + str(offset).encode()).hexdigest()
        return st.st_ino, self.generation(), digest
