"""The journal's snapshot: a load from it sees the same study as a replay of the whole journal.

A snapshot speeds nothing up at these sizes; these tests check that it is never trusted over the
journal. Real journal files; the last test runs real worker processes.
"""

import json
import logging
import os

import optuna
import pytest
from conftest import finished, load_study, plugin_experiment, run_script
from optuna.storages.journal import JournalFileBackend

import journal

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
        meta = json.loads(head)
        snapshot.write_bytes(json.dumps({**meta, "optuna": "3.6.1"}).encode() + b"\n" + payload)
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
