"""Storage benchmark: many concurrent workers doing ask + tell against one study.

    python bench/storage_bench.py                      # 16 workers x 10 trials, every storage
    python bench/storage_bench.py --workers 64 --trials 20

Each worker is a separate process (as array tasks are) that loads the study and runs
ask -> suggest -> tell with TPE. Reported per storage: finished trials, trials left RUNNING
(lost), errors, throughput and the median/p95 ask latency, then the ratios side by side.
Storages: journal (the tool's: journal.py with Optuna's JournalFileOpenLock, the flush to disk
after the lock), journal-queued (the same, its lock queued behind a fcntl lock: JOURNAL_LOCK=queued),
optuna-journal (Optuna's JournalFileBackend and JournalFileOpenLock, which flushes under the lock),
SQLite with timeout=60 and with its 5 s default.
"""

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import journal  # noqa: E402


def storage_for(kind, folder):
    path = Path(folder) / "journal.log"
    if kind == "journal":
        return journal.open_journal(path)  # the tool's default (Optuna's open lock, unless JOURNAL_LOCK is set)
    if kind == "journal-queued":  # the same, its lock queued behind a fcntl lock (JOURNAL_LOCK=queued)
        return optuna.storages.JournalStorage(journal.JournalFile(path, journal.JournalLock(str(path))))
    if kind == "optuna-journal":  # Optuna's own backend and open lock: fsync under the lock (the seed's)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    timeout = {"sqlite": 60, "sqlite-5s": 5}[kind]
    return f"sqlite:///{folder}/study.db?timeout={timeout}"


def worker(kind, folder, index, trials, queue):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    asks, errors = [], 0
    try:
        study = optuna.load_study(
            study_name="bench", storage=storage_for(kind, folder), sampler=optuna.samplers.TPESampler(seed=index)
        )
    except Exception:
        queue.put((asks, trials))
        return
    for _ in range(trials):
        try:
            started = time.perf_counter()
            trial = study.ask()
            x = trial.suggest_float("x", -10, 10)
            y = trial.suggest_int("y", 0, 10)
            asks.append(time.perf_counter() - started)
            study.tell(trial, (x - 2) ** 2 + y)
        except Exception:
            errors += 1
    queue.put((asks, errors))


def run(kind, workers, trials):
    with tempfile.TemporaryDirectory() as folder:
        optuna.create_study(study_name="bench", storage=storage_for(kind, folder))
        queue = multiprocessing.Queue()
        started = time.perf_counter()
        processes = [
            multiprocessing.Process(target=worker, args=(kind, folder, i, trials, queue)) for i in range(workers)
        ]
        for p in processes:
            p.start()
        results = [queue.get() for _ in processes]
        for p in processes:
            p.join()
        elapsed = time.perf_counter() - started
        study = optuna.load_study(study_name="bench", storage=storage_for(kind, folder))
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
    asks = sorted(a for r in results for a in r[0])
    return {
        "storage": kind,
        "finished": states.count("COMPLETE"),
        "lost": states.count("RUNNING"),
        "errors": sum(r[1] for r in results),
        "ops/s": 2 * states.count("COMPLETE") / elapsed,
        "ask median s": statistics.median(asks) if asks else float("nan"),
        "ask p95 s": asks[int(0.95 * (len(asks) - 1))] if asks else float("nan"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trials", type=int, default=10, help="trials per worker")
    parser.add_argument("--storages", default="journal,journal-queued,optuna-journal,sqlite,sqlite-5s")
    args = parser.parse_args()
    rows = [run(kind, args.workers, args.trials) for kind in args.storages.split(",")]
    print(f"{args.workers} workers x {args.trials} trials (ask + tell, TPE), {args.workers * args.trials} asked")
    columns = list(rows[0])
    print("  ".join(f"{c:>13}" for c in columns))
    for row in rows:
        print("  ".join(f"{v:>13.3f}" if isinstance(v, float) else f"{v:>13}" for v in row.values()))
    base = rows[0]
    for row in rows[1:]:
        print(
            f"{base['storage']} vs {row['storage']}: throughput x{base['ops/s'] / row['ops/s']:.1f}, "
            f"median ask x{row['ask median s'] / base['ask median s']:.1f} faster, "
            f"p95 ask x{row['ask p95 s'] / base['ask p95 s']:.1f} faster, "
            f"lost {base['lost']} vs {row['lost']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
