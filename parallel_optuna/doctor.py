"""--check_storage [--repair]: torn journal lines, a stale lock and trials without a worker, found and fixed."""

from parallel_optuna import attributes as attr
from parallel_optuna import liveness
from parallel_optuna.array_file import this_script
from parallel_optuna.run_dir import run_dir
from parallel_optuna.slurm import quote_command
from parallel_optuna.storage import journal, journal_lock
from parallel_optuna.study import (
    open_existing_study,
    storage_url,
)
from parallel_optuna.study_control import study_jobs


def check_storage(config, repair):
    """--check_storage: the journal's bad lines, a stale lock, RUNNING trials whose worker is gone.

    With --repair, after a backup of the journal: the stale lock is removed, the stuck trials are
    failed and retried (as any reconcile does), and the journal is rewritten without its bad lines
    so that Optuna's own reader reads it again; that only while no worker of the study lives and no
    other process has the study open (journal_readers), since live readers hold byte offsets into it.
    Exit 0 when the storage is (now) sound, else 1.
    """
    path = journal_file(config)
    bad = report_journal(path) if path else []
    lock_age = path and journal_lock.stale_lock(path)
    if lock_age:
        print(f"stale lock {journal_lock.lock_path(path)}: held {lock_age:.0f} s by nobody, its holder died mid-append")
    study = open_existing_study(config, reading=not repair)
    tasks = liveness.squeue_tasks(study_jobs(study))
    stuck = stuck_trials(study, tasks)
    if not repair:
        return storage_verdict(config, len(bad) + bool(lock_age) + len(stuck))
    if path and (bad or lock_age or stuck):
        print(f"backup: {journal.backup(path)}")
    if lock_age:
        journal_lock.break_lock(path)  # before the reconcile below, whose writes would wait for it
        print("removed the stale lock")
    if stuck:
        print(f"failed and re-enqueued: trials {liveness.reconcile(study, config, tasks)}")
    fixed = rewrite_journal(path, study, tasks, len(bad)) if bad else 0
    verdict = "storage OK after the repair" if bad or lock_age or stuck else "storage OK: nothing to repair"
    return storage_verdict(config, len(bad) - fixed, verdict)


def journal_file(config):
    """The study's journal file, when it uses the default storage."""
    saved = run_dir(config) / "storage_url"
    if storage_url(config) or saved.exists():
        print("storage: not the journal file: only trials without a worker are checked")
        return None
    return run_dir(config) / "journal.log"


def report_journal(path):
    if not path.exists():
        return []  # open_existing_study says there is no study
    ops, bad = journal.scan(path)
    print(f"journal {path}: {ops} ops, {len(bad)} bad line(s)")
    for entry in bad:
        print(f"  line {entry.line} (byte {entry.offset}): {entry.problem}")
    return bad


def stuck_trials(study, tasks):
    """RUNNING trials whose worker is gone, judged as the reconcile judges them (liveness.is_dead)."""
    stuck = [t for t in study.get_trials(deepcopy=False, states=(liveness.RUNNING,)) if liveness.is_dead(t, tasks)]
    for t in stuck:
        where = t.user_attrs.get(attr.SLURM_TASK) or f"pid {t.user_attrs.get('pid', '?')}"
        print(f"trial {t.number} RUNNING without a worker ({where} on {t.user_attrs.get('host', '?')} is gone)")
    return stuck


def live_workers(study, tasks):
    """What makes a rewrite unsafe: trials whose worker lives, and tasks SLURM still holds."""
    if tasks is None:
        return ["SLURM cannot be asked about the study's array jobs"]
    running = study.get_trials(deepcopy=False, states=(liveness.RUNNING,))
    alive = [
        f"trial {t.number} (pid {t.user_attrs.get('pid', '?')})" for t in running if not liveness.is_dead(t, tasks)
    ]
    return alive + [f"task {key} {state}" for key, (state, *_) in sorted(tasks.items()) if state not in liveness.GONE]


def rewrite_journal(path, study, tasks, n_bad):
    """Rewrite the journal without its bad lines if no worker lives; returns the problems it fixed."""
    alive = live_workers(study, tasks)
    if alive:
        print(
            f"journal not rewritten: workers alive ({', '.join(alive[:5])}); they skip the bad lines "
            "meanwhile: run --check_storage --repair again once the study is idle"
        )
        return 0
    try:
        kept = journal.rewrite(path)
    except journal.StudyInUse as e:
        print(f"journal not rewritten: {e}: run --check_storage --repair again once the study is idle")
        return 0
    print(f"journal rewritten without its {n_bad} bad line(s): {kept} ops kept, caches dropped")
    trials = journal.strict_read(path)
    print(f"Optuna's own reader reads it: {trials} trials")
    return n_bad


def storage_verdict(config, left, ok="storage OK"):
    if not left:
        print(ok)
        return 0
    which = quote_command(["--config", config.path, "--study_name", config["study"]["study_name"]])
    print(f"{left} problem(s) left; fix: {this_script()} {which} --check_storage --repair")
    return 1
