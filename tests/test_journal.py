"""A torn journal line, a stale lock, a full filesystem: the study goes on, and check/repair mends the journal.

Real journal files, real worker processes. The full-filesystem test mounts a small tmpfs (root);
outside CI it skips with the reason, with CI=true it must run.
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import PROJECT, finished, load_study, plugin_experiment, run_script
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.storages.journal._file import get_lock_file

from parallel_optuna.storage import journal, journal_lock, optuna_internals

TORN = b'{"op_code":8,"worker_id":"killed-mid-append","trial_id":0,"user_attr":{"no'
QUICK = {"training.sleep": 0.05, "training.epochs": 2}


def journal_of(path):
    return path.parent / "runs" / "tiny" / "journal.log"


def tear(path):
    """Append half an op under the lock, as a writer that hit a full disk (or died) mid-append leaves it."""
    with get_lock_file(JournalFileOpenLock(str(path))):
        with open(path, "ab") as f:
            f.write(TORN)


def strict_load(path):
    """The study as Optuna's own reader sees it (no tolerance for bad lines)."""
    return optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(JournalFileBackend(str(path))))


def optuna_cli_trials(path):
    cli = Path(sys.executable).parent / "optuna"
    out = subprocess.run(
        [cli, "trials", "--storage", path, "--study-name", "tiny", "-f", "json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_torn_line_study_goes_on_then_check_and_repair(tmp_path):
    path = plugin_experiment(tmp_path, {**QUICK, "study.n_trials": 3})
    assert run_script("worker.py", "--config", path).returncode == 0
    log = journal_of(path)
    live = load_study(path)  # a reader that holds byte offsets into the journal from before the tear
    tear(log)

    # The next worker seals the torn line and its own ops get lines of their own.
    out = run_script("worker.py", "--config", path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "sealed a torn line" in out.stdout
    assert [t.state.name for t in live.get_trials()] == ["COMPLETE", "COMPLETE"]
    assert run_script("worker.py", "--config", path).returncode == 0  # and every later load and write work
    status = run_script("submit_study.py", "--config", path, "--status")
    assert status.returncode == 0 and "3/3 finished" in status.stdout, status.stdout + status.stderr
    [torn] = journal.scan(log)[1]
    where = f"line {torn.line} (byte {torn.offset})"
    assert f"{log}: {where}: not a whole op" in status.stderr  # reported, not silently dropped
    assert run_script("submit_study.py", "--config", path, "--export_best").returncode == 0
    with pytest.raises(json.JSONDecodeError):
        strict_load(log)  # what the sealed line does to Optuna's own reader: the reason for --repair

    journal_lock.lock_path(log).touch()
    os.utime(journal_lock.lock_path(log), (time.time() - 300,) * 2)  # a lock left by a process killed mid-append
    cache = log.with_name("journal.log.snapshot")
    cache.write_bytes(b"derived from the old bytes")
    check = run_script("submit_study.py", "--config", path, "--check_storage")
    assert check.returncode == 1, check.stdout + check.stderr
    assert "1 bad line(s)" in check.stdout and where in check.stdout
    assert "stale lock" in check.stdout and "2 problem(s) left" in check.stdout
    assert log.read_bytes().count(TORN) == 1, "a check changes nothing"

    journal.close(optuna_internals.storage_of(live))  # a process that has the study open stops any rewrite
    repair = run_script("submit_study.py", "--config", path, "--check_storage", "--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "storage OK after the repair" in repair.stdout and "Optuna's own reader reads it: 3 trials" in repair.stdout
    backups = list(log.parent.glob("journal.log.bak-*"))
    assert len(backups) == 1 and backups[0].read_bytes().count(TORN) == 1
    assert not cache.exists() and not journal_lock.lock_path(log).exists()
    assert [t.state.name for t in strict_load(log).trials] == ["COMPLETE"] * 3
    assert [t["state"] for t in optuna_cli_trials(log)] == ["COMPLETE"] * 3
    assert run_script("submit_study.py", "--config", path, "--check_storage").stdout.endswith("storage OK\n")


def test_op_glued_onto_a_torn_line_by_plain_optuna_is_recovered(tmp_path, caplog):
    log = tmp_path / "journal.log"
    study = optuna.create_study(study_name="tiny", storage=journal.open_journal(log))
    study.tell(study.ask(), 1.0)
    with open(log, "ab") as f:
        f.write(TORN)
    plain = optuna.load_study(study_name="tiny", storage=optuna.storages.JournalStorage(JournalFileBackend(str(log))))
    with pytest.raises(AttributeError):
        plain.ask()  # Optuna's writer glued its create-trial op onto the torn line and lost sight of it
    study.tell(study.ask(), 2.0)  # after the merged line: Optuna's reader fails from here on
    with pytest.raises(json.JSONDecodeError):
        strict_load(log)
    with caplog.at_level("WARNING", logger="journal"):
        trials = optuna.load_study(study_name="tiny", storage=journal.open_journal(log)).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "RUNNING", "COMPLETE"]  # the glued op is read
    assert f"{log}: line 4 (byte" in caplog.text and "the torn op is lost, the glued one is read" in caplog.text
    ops, bad = journal.scan(log)
    assert len(bad) == 1 and journal.rewrite(log) == ops
    assert [t.state.name for t in strict_load(log).trials] == ["COMPLETE", "RUNNING", "COMPLETE"]


# ---------------------------------------------------------------- a rewrite while a process has the study open
def nine_trials_around_a_bad_line(path):
    """A study of 9 finished trials with a bad line in the middle, which a repair removes: later offsets move."""
    study = optuna.create_study(study_name="s", storage=journal.open_journal(path))
    for i in range(9):
        if i == 5:
            with open(path, "ab") as f:
                f.write(b"garbage\n")
        study.tell(study.ask(), float(i))
    journal.close(optuna_internals.storage_of(study))


def trials_of(storage):
    return [(t.number, t.state.name, t.value) for t in optuna.load_study(study_name="s", storage=storage).trials]


def test_a_reader_open_across_a_rewrite_reads_the_new_file_and_its_snapshot_holds_every_trial(tmp_path, caplog):
    path = tmp_path / "journal.log"
    nine_trials_around_a_bad_line(path)
    stale = journal.open_journal(path)  # a --local worker between trials, the dashboard: it keeps byte offsets
    assert journal.rewrite(path) == journal.scan(path)[0]  # (in this process: only other processes stop it)
    study = optuna.load_study(study_name="s", storage=journal.open_journal(path))
    study.tell(study.ask(), 9.0)  # the 10th trial, appended to the rewritten journal
    with caplog.at_level("WARNING", logger="journal"):
        journal.save_snapshot(stale)  # reads the new ops, then saves what it has
    assert "rewritten by a repair since this process read it: read again from the start" in caplog.text
    assert len(trials_of(stale)) == 10
    fresh = journal.open_journal(path)
    assert optuna_internals.journal_backend(fresh).restored > 0, "loaded from the stale reader's snapshot"
    assert trials_of(fresh) == trials_of(strict_storage(path)) == [(i, "COMPLETE", float(i)) for i in range(10)]


def strict_storage(path):
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def test_a_reader_that_has_not_read_the_rewritten_journal_saves_no_snapshot(tmp_path):
    path = tmp_path / "journal.log"
    nine_trials_around_a_bad_line(path)
    stale = journal.open_journal(path)
    journal.rewrite(path)
    stale._backend.save_snapshot(b"the state of the old file")  # as Optuna would, before reading again
    assert not path.with_name("journal.log.snapshot").exists()
    assert len(trials_of(journal.open_journal(path))) == 9


def test_a_reader_whose_journal_is_swapped_for_another_stops_with_one_line(tmp_path):
    path, other = tmp_path / "journal.log", tmp_path / "other.log"
    nine_trials_around_a_bad_line(path)
    nine_trials_around_a_bad_line(other)  # another study of the same shape: its own worker ids
    stale = journal.open_journal(path)
    os.replace(other, path)  # not a repair: the ops this process read are not in it
    with pytest.raises(journal.JournalReplaced) as stopped:
        trials_of(stale)
    assert (
        str(stopped.value).startswith(f"error: {path}: replaced by a file that does not continue")
        and len(str(stopped.value).splitlines()) == 1
    )


def hold_study(log):
    """Another process that has the study open (a worker between trials, status, the dashboard)."""
    holder = subprocess.Popen(
        [sys.executable, PROJECT / "tests" / "processes.py", "hold_study", log],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "open"
    return holder


def test_the_repair_does_not_rewrite_while_another_process_has_the_study_open(tmp_path):
    path = plugin_experiment(tmp_path, {**QUICK, "study.n_trials": 1})
    assert run_script("worker.py", "--config", path).returncode == 0
    log = journal_of(path)
    tear(log)
    holder = hold_study(log)  # no RUNNING trial, no task in squeue: only the lock shows it
    try:
        before = log.read_bytes()
        with pytest.raises(journal.StudyInUse):
            journal.rewrite(log)
        repair = run_script("submit_study.py", "--config", path, "--check_storage", "--repair")
        assert repair.returncode == 1, repair.stdout + repair.stderr
        refused = [line for line in repair.stdout.splitlines() if line.startswith("journal not rewritten")]
        assert refused == [
            "journal not rewritten: a process still has the study open (a worker, --local, status, export or the "
            "dashboard): run --check_storage --repair again once the study is idle"
        ]
        assert log.read_bytes() == before
    finally:
        holder.communicate("\n", timeout=60)
    repair = run_script("submit_study.py", "--config", path, "--check_storage", "--repair")
    assert repair.returncode == 0 and "storage OK after the repair" in repair.stdout, repair.stdout + repair.stderr
    assert journal.scan(log)[1] == []


def wait_for(condition, timeout=120, what="condition"):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def a_checkpoint(path):
    return list((path.parent / "runs" / "tiny" / "trials").glob("*/checkpoint.pt"))


def local_study(path, stderr):
    """`submit_study.py --local 2` in the background, its output kept for the assertions."""
    command = [sys.executable, "submit_study.py", "--config", path, "--local", "2"]
    return subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.PIPE, stderr=stderr, text=True)


def test_torn_line_between_the_ops_of_running_workers(tmp_path):
    path = plugin_experiment(tmp_path, {"training.sleep": 0.8, "training.epochs": 6, "study.n_trials": 4})
    run = local_study(path, stderr=subprocess.STDOUT)
    wait_for(lambda: a_checkpoint(path), what="a checkpoint")
    tear(journal_of(path))
    repair = run_script("submit_study.py", "--config", path, "--check_storage", "--repair")
    assert repair.returncode == 1 and "journal not rewritten: workers alive (trial" in repair.stdout, repair.stdout
    output = run.communicate(timeout=240)[0]
    assert run.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "sealed a torn line" in output
    study = load_study(path)
    assert len(finished(study)) == 4 and all(t.state.name == "COMPLETE" for t in study.trials), output[-3000:]
    assert all(sorted(t.intermediate_values) == list(range(6)) for t in study.trials)
    assert [b.problem.startswith("not a whole op") for b in journal.scan(journal_of(path))[1]] == [True]


def test_kill_9_while_holding_the_journal_lock(tmp_path):
    """Measured: the other workers wait out Optuna's lock grace (30 s), then break the lock and go on."""
    path = plugin_experiment(tmp_path, {**QUICK, "study.n_trials": 1})
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    log = journal_of(path)
    holder = subprocess.Popen(
        [sys.executable, PROJECT / "tests" / "processes.py", "hold_lock_forever", log],
        stdout=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    started = time.time()
    out = run_script("worker.py", "--config", path)
    waited = time.time() - started
    print(f"a worker waited {waited:.1f} s for the lock of a process killed with kill -9")
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert journal_lock.LOCK_GRACE_S <= waited < journal_lock.LOCK_GRACE_S + 60, waited
    assert len(finished(load_study(path))) == 1


# ---------------------------------------------------------------- a real full filesystem
@pytest.fixture
def full_disk_runs(tmp_path):
    """A 4 MiB tmpfs mounted where the experiment's runs/ go: a filesystem that really fills up."""
    runs = tmp_path / "exp" / "runs"
    runs.mkdir(parents=True)
    problem = None if os.geteuid() == 0 and shutil.which("mount") else "it mounts a tmpfs: needs root"
    if not problem:
        out = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(runs)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        problem = out.returncode and f"mount -t tmpfs failed: {out.stderr.strip()}"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the full-filesystem test cannot run: {problem}")
        pytest.skip(f"{problem}; run as root (CI does) to fill a real filesystem")
    yield runs
    subprocess.run(["umount", "--lazy", str(runs)], capture_output=True, timeout=60, check=True)


def fill(folder):
    """Write a filler file until the filesystem is full (ENOSPC); returns it."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_filesystem_mid_study_loses_at_most_the_torn_ops(tmp_path, full_disk_runs):
    path = plugin_experiment(tmp_path, {"training.sleep": 0.5, "training.epochs": 6, "study.n_trials": 4})
    log = journal_of(path)
    run = local_study(path, stderr=subprocess.PIPE)
    wait_for(lambda: len(a_checkpoint(path)) >= 2, what="both workers' first checkpoints")
    filler = fill(full_disk_runs)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 1, out[-2000:] + err[-3000:]  # its workers could not finish their trials
    assert "Traceback" not in err and "Logging error" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, err  # one line per worker, naming the file, the cause, the fix and what happens
    assert all(f"{full_disk_runs}/tiny/" in e and "no space left on device (ENOSPC); fix: free" in e for e in errors)
    assert all("the trial stays RUNNING and is retried from its last checkpoint" in e for e in errors)
    assert not list(full_disk_runs.glob("tiny/trials/*/*.partial")), "a failed checkpoint write is cleaned up"
    before = {t.number for t in load_study(path).trials if t.state.name == "COMPLETE"}

    writer = load_study(path)  # one more writer (the tool's storage) runs into the full disk mid-append
    with pytest.raises(OSError) as full:
        for _ in range(1000):
            writer.set_user_attr("note", "x" * 300)
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(log)
    # The --local run failed and retried its workers' trials as they ended (their partial checkpoints,
    # removed, had left room for that): status has nothing to write, and shows the study on the full disk.
    status = run_script("submit_study.py", "--config", path, "--status")
    assert status.returncode == 0 and "error:" not in status.stderr, status.stdout + status.stderr
    assert "FAIL 2  WAITING 2" in status.stdout and "0/4 finished" in status.stdout, status.stdout

    filler.unlink()  # space again: the same command goes on where the study stopped
    again = run_script("submit_study.py", "--config", path, "--local", 2, timeout=240)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    study = load_study(path)
    assert len(finished(study)) == 4 and {t.number for t in finished(study)} >= before
    retries = [t for t in finished(study) if "retry_of" in t.user_attrs]
    assert retries and all(sorted(t.intermediate_values) == list(range(6)) for t in retries)
    assert any("checkpoint" in Path(t.user_attrs["log_path"]).read_text() for t in retries)
    bad = journal.scan(log)[1]
    print(f"full disk: {errors[0]}\n{len(bad)} torn op(s) at (line, byte) {[(b.line, b.offset) for b in bad]}")
    assert len(bad) <= len(errors) + 1, [b.problem for b in bad]  # at most the op each failed process was writing

    for opened in (study, writer):
        journal.close(optuna_internals.storage_of(opened))  # else the repair sees them and does not rewrite
    repair = run_script("submit_study.py", "--config", path, "--check_storage", "--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert len(strict_load(log).trials) == len(study.trials) == len(optuna_cli_trials(log))


# ---------------------------------------------------------------- what reaches the disk when
def test_a_result_is_on_disk_before_tell_returns_the_ask_waits_for_no_disk(tmp_path, monkeypatch):
    """A trial's end is flushed to disk (fsync) before tell() returns, and that flush covers every op
    before it; creating a trial and setting its params and attributes wait for no flush of their own."""
    path = tmp_path / "journal.log"
    flushed = []  # the journal's size at each flush of it (this process may flush other tests' journals too)

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}") == str(path):
            flushed.append(os.fstat(fd).st_size)
        real_fsync(fd)

    real_fsync = os.fsync
    monkeypatch.setattr(journal.os, "fsync", fsync)
    study = optuna.create_study(study_name="s", storage=journal.open_journal(path))
    flushed.clear()
    trial = study.ask()
    trial.suggest_float("lr", 1e-4, 1e-1, log=True)
    trial.set_user_attr("worker", "node1")
    trial.report(0.5, step=0)
    assert flushed == []
    study.tell(trial, 0.25)
    assert flushed == [path.stat().st_size]
    reread = optuna.load_study(study_name="s", storage=journal.open_journal(path)).trials[0]
    assert (reread.value, reread.user_attrs, reread.intermediate_values) == (0.25, {"worker": "node1"}, {0: 0.5})

    flushed.clear()
    study.enqueue_trial({"lr": 0.01})  # a retry or the user's config, WAITING: no worker holds it yet
    assert flushed == [path.stat().st_size]
    study.ask().set_user_attr("worker", "node2")  # a process that exits now still flushes what it wrote
    journal._flush_on_exit()
    assert flushed[-1] == path.stat().st_size and str(path) not in journal._unflushed
