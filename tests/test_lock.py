"""The journal's queued lock (JOURNAL_LOCK=queued): Optuna's lock file behind a fcntl lock. Real files and processes."""

import errno
import json
import logging
import signal
import subprocess
import sys
import time

import pytest
from conftest import PROJECT

from parallel_optuna.storage import journal, journal_lock


def start(program, *args):
    return subprocess.Popen(
        [sys.executable, str(PROJECT / "tests" / "processes.py"), program, *map(str, args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_writers_contending_for_the_lock_all_complete_with_whole_lines(tmp_path):
    path = tmp_path / "journal.log"
    writers = [start("append_ops", path, f"w{k}", 150) for k in range(3)]
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    ops, bad = journal.scan(path)
    assert (ops, bad) == (450, [])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    for k in range(3):
        assert [op["user_attr"]["i"] for op in lines if op["worker_id"] == f"w{k}"] == list(range(150))
    assert not journal_lock.lock_path(path).exists(), "released"
    assert journal_lock.stale_lock(path) is None


def test_a_holder_killed_with_kill_9_does_not_stop_the_next_writer_for_the_grace(tmp_path, capfd):
    path = tmp_path / "journal.log"
    path.touch()
    holder = start("hold_lock", path, "queued")
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert journal_lock.lock_path(path).exists(), "the lock file stays; the kernel released the fcntl lock"
    # Waiting Optuna's grace would take LOCK_GRACE_S; the queued writer breaks a dead holder's lock at once.
    writer = start("append_ops", path, "next", 1)
    assert writer.wait(timeout=journal_lock.LOCK_GRACE_S / 2) == 0
    assert "died holding it" in writer.stderr.read()
    assert journal.scan(path) == (1, [])
    assert not journal_lock.lock_path(path).exists()


def test_a_holder_stopped_by_scontrol_suspend_does_not_stop_the_queue_for_good(tmp_path):
    """`scontrol suspend` sends SIGSTOP: the holder keeps the fcntl lock, and its waiters must not wait forever."""
    path = tmp_path / "journal.log"
    path.touch()
    holder = start("hold_lock", path, "queued")
    try:
        assert holder.stdout.readline().strip() == "locked"
        holder.send_signal(signal.SIGSTOP)
        writer = start("append_ops", path, "next", 1)
        started = time.monotonic()
        # The queue is left after the grace with no progress, then Optuna's own grace breaks the lock file.
        assert writer.wait(timeout=3 * journal_lock.LOCK_GRACE_S + 30) == 0, writer.stderr.read()
        waited = time.monotonic() - started
        print(f"a queued writer waited {waited:.1f} s behind a stopped holder")
        assert waited > journal_lock.LOCK_GRACE_S, "a stopped holder is not taken for a dead one"
        assert "made no progress" in writer.stderr.read()
        assert journal.scan(path) == (1, [])
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_file_of_a_writer_outside_the_queue_is_respected(tmp_path):
    """Optuna's CLI (or a node without fcntl locks) holds the lock file alone: queued writers wait for it."""
    path = tmp_path / "journal.log"
    path.touch()
    holder = start("hold_lock", path, "open")
    assert holder.stdout.readline().strip() == "locked"
    writer = start("append_ops", path, "queued", 1)
    with pytest.raises(subprocess.TimeoutExpired):
        writer.wait(timeout=2)
    assert journal.scan(path) == (0, [])
    holder.communicate("\n", timeout=30)
    assert writer.wait(timeout=60) == 0
    assert journal.scan(path) == (1, [])


def test_without_fcntl_locks_the_lock_file_alone_serializes(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(journal_lock.fcntl, "lockf", no_locks)
    monkeypatch.setattr(journal_lock.JournalLock, "warned", False)
    path = tmp_path / "journal.log"
    backend = journal.JournalFile(path, journal_lock.JournalLock(str(path)))
    with caplog.at_level(logging.WARNING, logger="journal"):
        for i in range(3):
            backend.append_logs([{"op_code": 8, "worker_id": "w", "trial_id": 0, "user_attr": {"i": i}}])
    assert journal.scan(path) == (3, [])
    assert caplog.text.count("no fcntl locks here") == 1


def test_the_default_lock_is_optunas_open_lock_and_queued_is_opt_in(tmp_path, monkeypatch):
    path = str(tmp_path / "journal.log")
    monkeypatch.delenv("JOURNAL_LOCK", raising=False)
    assert type(journal_lock.default_lock(path)).__name__ == "JournalFileOpenLock"
    monkeypatch.setenv("JOURNAL_LOCK", "queued")
    assert isinstance(journal_lock.default_lock(path), journal_lock.JournalLock)
