"""The journal's snapshot: a load from it sees the same study as a replay of the whole journal.

A snapshot speeds nothing up at these sizes; these tests check that it is never trusted over the
journal. Real journal files; the last test runs real worker processes.
"""

import hashlib
import hmac
import json
import logging
import os
import pickle
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import optuna
import pytest
from conftest import finished, load_study, plugin_experiment, run_script
from optuna.storages.journal import JournalFileBackend

from parallel_optuna.storage import journal, journal_snapshot

X = optuna.distributions.FloatDistribution(0, 1)
STATES = optuna.trial.TrialState


def add_trials(storage, count, start=0):
    """Trials as workers leave them: attributes, reports, and every end state."""
    study = optuna.create_study(study_name="snap", storage=storage, load_if_exists=True)
    for i in range(start, start + count):
        trial = study.ask({"x": X})
        trial.set_user_attr("host", f"node-{i % 3}")
        for step in range(3):
            trial.report(i + step / 10, step)
        state = (STATES.COMPLETE, STATES.PRUNED, STATES.FAIL, STATES.RUNNING)[i % 4]
        if state != STATES.RUNNING:
            study.tell(trial, i / 7 if state == STATES.COMPLETE else None, state=state)
    return study


def seen(storage):
    """Everything a worker or status reads of the study's trials."""
    study = optuna.load_study(study_name="snap", storage=storage)
    return [
        (t.number, t.state, t.values, t.params, t.user_attrs, t.system_attrs, t.intermediate_values, t.datetime_start)
        for t in study.get_trials(deepcopy=False)
    ]


def full_replay(path):
    return seen(optuna.storages.JournalStorage(JournalFileBackend(str(path))))  # Optuna's own reader


@pytest.fixture
def path(tmp_path):
    return tmp_path / "journal.log"


def snapshot_of(path):
    return path.with_name(path.name + ".snapshot")


def test_a_load_from_the_snapshot_equals_a_full_replay_and_extends_a_stale_one(path):
    add_trials(journal.open_journal(path), 12)
    journal.save_snapshot(journal.open_journal(path))
    assert snapshot_of(path).stat().st_mode & 0o777 == 0o600, "a pickle: readable by the owner only"
    add_trials(journal.open_journal(path), 9, start=12)  # the snapshot is now behind the journal

    storage = journal.open_journal(path)
    total, _ = journal.scan(path)
    assert 0 < storage._backend.restored < total, "restored from the snapshot, then the ops after it"
    assert seen(storage) == full_replay(path)
    assert len(seen(storage)) == 21
    add_trials(storage, 3, start=21)  # and goes on writing as any worker
    assert seen(journal.open_journal(path)) == full_replay(path)
    assert [p.name for p in path.parent.iterdir() if "partial" in p.name] == []


def test_op_numbering_across_bad_lines_agrees_with_the_snapshot(path):
    add_trials(journal.open_journal(path), 4)
    with open(path, "ab") as f:
        f.write(b'{"op_code":8,"worker_id":"torn","tri\n')  # a sealed torn line: skipped, not counted
    add_trials(journal.open_journal(path), 4, start=4)
    journal.save_snapshot(journal.open_journal(path))
    add_trials(journal.open_journal(path), 2, start=8)
    storage = journal.open_journal(path)
    assert storage._backend.restored > 0
    expected = replay(path)
    assert seen(storage) == expected and len(expected) == 10


def replay(path):
    """The study as a load without any snapshot sees it (bad lines skipped, as the tool reads)."""
    copy = path.with_name("copy.log")
    copy.write_bytes(path.read_bytes())
    return seen(optuna.storages.JournalStorage(journal.JournalFile(copy)))


def meta_of(head):
    return json.loads(head.partition(b" ")[2])


def signed(meta, key=None):
    """A snapshot's first line for this metadata, signed with this user's key (or another)."""
    text = json.dumps(meta).encode()
    tag = hmac.new(key or journal_snapshot.snapshot_key(), text, hashlib.sha256).hexdigest().encode()
    return tag + b" " + text


def damage(path, how):
    snapshot = snapshot_of(path)
    data = snapshot.read_bytes()
    head, _, payload = data.partition(b"\n")
    if how == "garbage":
        snapshot.write_bytes(b"\x80garbage\n\x00\x01")
    elif how == "truncated pickle":
        snapshot.write_bytes(data[: len(data) // 2])
    elif how == "flipped byte":
        snapshot.write_bytes(head + b"\n" + payload[:-5] + bytes([payload[-5] ^ 1]) + payload[-4:])
    elif how == "other optuna":
        snapshot.write_bytes(signed({**meta_of(head), "optuna": "3.6.1"}) + b"\n" + payload)
    elif how == "journal rewritten":
        # The repair drops the bad line in the middle: every later offset moves. (A repair also deletes
        # the snapshot; this one is put back, as if copied back from a backup.)
        journal.rewrite(path)
        snapshot.write_bytes(data)
    elif how == "other journal":
        other = path.with_name("other.log")
        add_trials(journal.open_journal(other), 12)
        path.write_bytes(other.read_bytes())


@pytest.mark.parametrize(
    "how", ["garbage", "truncated pickle", "flipped byte", "other optuna", "journal rewritten", "other journal"]
)
def test_a_damaged_or_mismatched_snapshot_is_ignored_and_rebuilt(path, how, caplog, monkeypatch):
    add_trials(journal.open_journal(path), 6)
    with open(path, "ab") as f:
        f.write(b"garbage\n")  # a bad line before the snapshot's offset
    add_trials(journal.open_journal(path), 6, start=6)
    journal.save_snapshot(journal.open_journal(path))
    damage(path, how)
    monkeypatch.setattr(journal, "REFRESH_OPS", 1)  # this load replays enough to write a new one
    with caplog.at_level(logging.WARNING, logger="journal"):
        storage = journal.open_journal(path)
    assert storage._backend.restored == 0
    assert "snapshot: ignored" in caplog.text
    assert seen(storage) == replay(path)

    caplog.clear()
    again = journal.open_journal(path)
    assert again._backend.restored == journal.scan(path)[0], "rebuilt from the journal"
    assert "ignored" not in caplog.text
    assert seen(again) == replay(path)


def test_a_repair_deletes_the_snapshot_and_the_next_load_replays(path):
    add_trials(journal.open_journal(path), 6)
    journal.save_snapshot(journal.open_journal(path))
    snapshot_of(path).with_name("journal.log.snapshot.1234.partial").write_bytes(b"left by a killed writer")
    journal.rewrite(path)
    assert list(path.parent.glob("journal.log.snapshot*")) == []
    storage = journal.open_journal(path)
    assert storage._backend.restored == 0 and seen(storage) == full_replay(path)


def test_an_older_snapshot_never_replaces_a_newer_one(path):
    add_trials(journal.open_journal(path), 4)
    old = journal.open_journal(path)  # has read the journal up to here
    add_trials(journal.open_journal(path), 4, start=4)
    journal.save_snapshot(journal.open_journal(path))
    newer = journal.Snapshot(path).covered()
    old._backend.save_snapshot(b"an older state")  # as Optuna would, without reading further
    assert journal.Snapshot(path).covered() == newer


def test_workers_restored_from_snapshots_finish_the_study_exactly(tmp_path):
    """Workers start from a snapshot, Optuna saves a new one at trial 100 mid-study, and the budget is met exactly."""
    path = plugin_experiment(tmp_path, {"training.sleep": 0.02, "training.epochs": 2, "study.n_trials": 104})
    log = path.parent / "runs" / "tiny" / "journal.log"
    assert run_script("submit_study.py", "--config", path, "--no-submit_jobs").returncode == 0
    study = load_study(path)
    lr = optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)
    space = {"model.d_pos": optuna.distributions.IntDistribution(2, 12, step=2), "training.lr": lr}
    for i in range(99):
        params = {"model.d_pos": 4, "training.lr": 1e-3 + i * 1e-4}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=1))
    journal.save_snapshot(journal.open_journal(log))
    before = journal.Snapshot(log).covered()

    out = run_script("submit_study.py", "--config", path, "--local", 2)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert journal.Snapshot(log).covered() > before, "Optuna saved one when trial 100 was created"
    study = load_study(path)
    assert len(finished(study)) == 104
    assert [t for t in study.get_trials() if t.state.name in ("RUNNING", "WAITING")] == []
    assert seen_all(load_study(path)) == seen_all(optuna.load_study(study_name="tiny", storage=strict(log)))
    assert os.stat(log.parent).st_mode & 0o777 == 0o700


def strict(log):
    return optuna.storages.JournalStorage(JournalFileBackend(str(log)))


def seen_all(study):
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in study.get_trials(deepcopy=False)]


# ---------------------------------------------------------------- a snapshot is no way in
def plant(path, how):
    """Put something in the snapshot's place that must not be trusted."""
    snapshot = snapshot_of(path)
    head, _, payload = snapshot.read_bytes().partition(b"\n")
    if how == "wrong signature":
        tag, _, text = head.partition(b" ")
        snapshot.write_bytes(bytes([tag[0] ^ 1]) + tag[1:] + b" " + text + b"\n" + payload)
    elif how == "signed by another key":
        snapshot.write_bytes(signed(meta_of(head), key=b"k" * 32) + b"\n" + payload)
    elif how == "no ops":
        # Signed with the right key and matching the journal: at offset 0 it would match any journal.
        where = journal.Snapshot(path)._journal_at(0)
        meta = {**meta_of(head), "ops": 0, "offset": 0, "line": 1, "journal": where[2]}
        snapshot.write_bytes(signed(meta) + b"\n" + payload)
    elif how == "symbolic link":
        target = path.with_name("elsewhere")
        snapshot.rename(target)
        snapshot.symlink_to(target)


@pytest.mark.parametrize("how", ["wrong signature", "signed by another key", "no ops", "symbolic link"])
def test_an_untrusted_snapshot_is_ignored_with_one_warning_and_rebuilt(path, how, caplog, monkeypatch):
    add_trials(journal.open_journal(path), 12)
    journal.save_snapshot(journal.open_journal(path))
    plant(path, how)
    monkeypatch.setattr(journal, "REFRESH_OPS", 1)  # this load replays enough to write a new one
    with caplog.at_level(logging.WARNING, logger="journal"):
        storage = journal.open_journal(path)
    assert storage._backend.restored == 0
    assert [r.getMessage() for r in caplog.records if "snapshot" in r.getMessage()] == [
        f"{snapshot_of(path)}: ignored, {REASONS[how]}: the whole journal is replayed"
    ]
    assert seen(storage) == full_replay(path) and len(seen(storage)) == 12

    again = journal.open_journal(path)
    assert again._backend.restored == journal.scan(path)[0], "rebuilt from the journal"
    assert not snapshot_of(path).is_symlink()
    assert seen(again) == full_replay(path)


REASONS = {
    "wrong signature": "its signature does not verify (not written by this user, or damaged)",
    "signed by another key": "its signature does not verify (not written by this user, or damaged)",
    "no ops": "it has applied no ops",
    "symbolic link": "it is a symbolic link",
}


def test_the_key_is_made_once_0600_in_a_0700_folder_under_xdg_config_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key = journal_snapshot.snapshot_key()
    where = tmp_path / "config" / "parallel-optuna" / "snapshot.key"
    assert journal_snapshot.key_path() == where and len(key) == 32
    assert where.stat().st_mode & 0o777 == 0o600 and where.parent.stat().st_mode & 0o777 == 0o700
    journal_snapshot._keys.clear()  # another process of this user reads the same key
    assert journal_snapshot.snapshot_key() == key
    assert [p.name for p in where.parent.iterdir()] == ["snapshot.key"]


def test_a_teammate_replays_the_journal_with_one_line_and_writes_no_snapshot(path, caplog, monkeypatch):
    add_trials(journal.open_journal(path), 12)
    journal.save_snapshot(journal.open_journal(path))
    owners = snapshot_of(path).read_bytes()
    monkeypatch.setattr(journal_snapshot.os, "geteuid", lambda: os.getuid() + 4242)  # another user's process
    monkeypatch.setattr(journal, "REFRESH_OPS", 1)
    with caplog.at_level(logging.INFO, logger="journal"):
        storage = journal.open_journal(path)
        assert seen(storage) == full_replay(path)
    assert storage._backend.restored == 0
    assert [r.getMessage() for r in caplog.records] == [
        f"{snapshot_of(path)}: ignored, it belongs to uid {os.getuid()}, not to this user (uid {os.getuid() + 4242}), "
        "who cannot verify it: the whole journal is replayed"
    ]
    assert snapshot_of(path).read_bytes() == owners


# ---------------------------------------------------------------- another Unix user plants one
@pytest.fixture
def other_user():
    """A second Unix user, made for the test (root); outside CI it skips with the reason, with CI=true it must run."""
    name = f"po-other-{os.getpid()}"
    problem = None if os.geteuid() == 0 and shutil.which("useradd") else "it creates a Unix user: needs root"
    if not problem:
        out = subprocess.run(["useradd", "--user-group", "--no-create-home", name], capture_output=True, text=True)
        problem = out.returncode and f"useradd failed: {out.stderr.strip()}"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the second-user test cannot run: {problem}")
        pytest.skip(f"{problem}; run as root (CI does) to plant a snapshot as another user")
    yield pwd.getpwnam(name)
    subprocess.run(["userdel", name], capture_output=True, timeout=60)


class RunsCode:
    """Unpickled, it creates the marker file: what a planted pickle could do instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def planted_snapshot(path, marker):
    """A snapshot at offset 0, as the format before signatures accepted it for any journal."""
    payload = pickle.dumps(RunsCode(marker))
    meta = {"format": 1, "optuna": optuna.__version__, "ops": 0, "offset": 0, "line": 1}
    meta.update(journal=hashlib.sha256(b"||0").hexdigest(), sha256=hashlib.sha256(payload).hexdigest())
    return json.dumps(meta).encode() + b"\n" + payload


def test_a_snapshot_planted_by_another_user_runs_nothing(other_user, caplog, monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="po-shared-"))
    try:
        base.chmod(0o755)
        runs = base / "runs"
        runs.mkdir()
        os.chown(runs, 0, other_user.pw_gid)
        runs.chmod(0o2770)  # a run directory the group may write to: the other user is in it
        path = runs / "journal.log"
        add_trials(journal.open_journal(path), 12)
        journal.save_snapshot(journal.open_journal(path))
        marker = base / "ran"
        swap = f"cat > {snapshot_of(path)}.new && mv -f {snapshot_of(path)}.new {snapshot_of(path)}"
        out = subprocess.run(
            ["sh", "-c", swap],
            input=planted_snapshot(path, marker),
            user=other_user.pw_uid,
            group=other_user.pw_gid,
            extra_groups=[],
            capture_output=True,
            timeout=60,
        )
        assert out.returncode == 0 and snapshot_of(path).stat().st_uid == other_user.pw_uid, out.stderr
        monkeypatch.setattr(journal, "REFRESH_OPS", 1)
        with caplog.at_level(logging.WARNING, logger="journal"):
            storage = journal.open_journal(path)
            assert not marker.exists(), "the planted pickle ran"
            assert seen(storage) == full_replay(path) and len(seen(storage)) == 12
        assert f"belongs to uid {other_user.pw_uid}" in caplog.text
        assert snapshot_of(path).stat().st_uid == os.geteuid(), "replaced by the owner's own"
        assert seen(journal.open_journal(path)) == full_replay(path) and not marker.exists()
    finally:
        shutil.rmtree(base)
