"""Storage benchmark: many concurrent workers doing ask + tell against one study.

    python bench/storage_bench.py                      # 16 workers x 10 trials, every storage
    python bench/storage_bench.py --workers 256 --trials 10 --storages journal,postgres,sqlite
    python bench/storage_bench.py --workers 256 --trials 10 --train 5    # each trial "trains" ~5 s

postgres is the local server of scripts/local_postgres.sh (started here when run as root), or
$BENCH_POSTGRES_URL; each run gets a fresh database `optuna_bench`. Without a server it is left out.

Each worker is a separate process (as array tasks are) that loads the study and runs
ask -> suggest -> tell with TPE (--sampler random: no sampling work, the storage alone).
Reported per storage: finished trials, trials left RUNNING (lost), errors, throughput, the
median/p95 ask latency, and the workers' CPU per trial and the cores it kept busy (as many as the
machine has: the asks wait for a core, not for the storage), then the ratios side by side.
Storages: journal (the tool's: journal.py with Optuna's JournalFileOpenLock, the flush to disk
after the lock, only for a trial's end and what must outlive a crash), journal-flush-every-op
(the same, every op flushed), journal-queued (the same, its lock queued behind a fcntl lock: JOURNAL_LOCK=queued),
optuna-journal (Optuna's JournalFileBackend and JournalFileOpenLock, which flushes under the lock),
SQLite with timeout=60 and with its 5 s default.

Without --train every worker asks again the moment it has told: the storage is saturated, which
no real study does. With --train S each trial sleeps 0.5 S to 1.5 S between ask and tell (the
workers' starts spread over one S), so the asks arrive as they would from trials that train.
"""

import argparse
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from parallel_optuna.storage import journal, journal_lock  # noqa: E402

SERVER = Path(__file__).resolve().parent.parent / "scripts" / "local_postgres.sh"


def postgres_server():
    """The PostgreSQL URL to measure, or None (with the reason printed) when there is none."""
    url = os.environ.get("BENCH_POSTGRES_URL")
    if url:
        return url
    try:
        out = subprocess.run(["bash", str(SERVER), "up"], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        out = subprocess.CompletedProcess([], 1, "", str(e))
    if out.returncode != 0 or not out.stdout.strip():
        why = (out.stderr.strip().splitlines() or ["failed"])[-1]
        print(f"postgres left out: {SERVER.name} up: {why}", file=sys.stderr)
        return None
    return out.stdout.strip().splitlines()[-1]


def fresh_database(url, name="optuna_bench"):
    """Drop and create the database `name` on url's server; the URL of the new database."""
    import psycopg2

    u = make_url(url)
    connection = psycopg2.connect(host=u.host, port=u.port, user=u.username, password=u.password, dbname=u.database)
    connection.autocommit = True
    try:
        connection.cursor().execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        connection.cursor().execute(f"CREATE DATABASE {name}")
    finally:
        connection.close()
    return u.set(database=name).render_as_string(hide_password=False)


class FlushEveryOp(journal.JournalFile):
    """The tool's journal as it was: every op flushed to disk before Optuna goes on."""

    def flush_now(self, logs):
        return True


def storage_for(kind, folder, postgres=None):
    if kind == "postgres":
        return postgres
    path = Path(folder) / "journal.log"
    if kind == "journal":
        return journal.open_journal(path)  # the tool's default (Optuna's open lock, unless JOURNAL_LOCK is set)
    if kind == "journal-flush-every-op":
        return optuna.storages.JournalStorage(FlushEveryOp(path))
    if kind == "journal-queued":  # the same, its lock queued behind a fcntl lock (JOURNAL_LOCK=queued)
        return optuna.storages.JournalStorage(journal.JournalFile(path, journal_lock.JournalLock(str(path))))
    if kind == "optuna-journal":  # Optuna's own backend and open lock: fsync under the lock (the seed's)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    timeout = {"sqlite": 60, "sqlite-5s": 5}[kind]
    return f"sqlite:///{folder}/study.db?timeout={timeout}"


SAMPLERS = {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler}


def worker(kind, folder, postgres, index, trials, train, sampler, queue):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    asks, errors = [], 0
    pace = random.Random(index)
    time.sleep(pace.uniform(0, train))
    try:
        study = optuna.load_study(
            study_name="bench",
            storage=storage_for(kind, folder, postgres),
            sampler=SAMPLERS[sampler](seed=index),
        )
    except Exception:
        queue.put((asks, trials, 0.0))
        return
    cpu = time.process_time()
    for _ in range(trials):
        try:
            started = time.perf_counter()
            trial = study.ask()
            x = trial.suggest_float("x", -10, 10)
            y = trial.suggest_int("y", 0, 10)
            asks.append(time.perf_counter() - started)
            time.sleep(pace.uniform(0.5 * train, 1.5 * train))
            study.tell(trial, (x - 2) ** 2 + y)
        except Exception:
            errors += 1
    queue.put((asks, errors, time.process_time() - cpu))


def run(kind, workers, trials, train=0.0, sampler="tpe", postgres=None):
    postgres = fresh_database(postgres) if kind == "postgres" else None
    with tempfile.TemporaryDirectory() as folder:
        optuna.create_study(study_name="bench", storage=storage_for(kind, folder, postgres))
        queue = multiprocessing.Queue()
        started = time.perf_counter()
        processes = [
            multiprocessing.Process(target=worker, args=(kind, folder, postgres, i, trials, train, sampler, queue))
            for i in range(workers)
        ]
        for p in processes:
            p.start()
        results = [queue.get() for _ in processes]
        for p in processes:
            p.join()
        elapsed = time.perf_counter() - started
        study = optuna.load_study(study_name="bench", storage=storage_for(kind, folder, postgres))
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
        # the workers' own CPU (sampling, replaying the others' ops) per trial, and how many cores it kept busy
        "cpu ms/trial": 1000 * sum(r[2] for r in results) / max(1, len(asks)),
        "cores busy": sum(r[2] for r in results) / elapsed,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--trials", type=int, default=10, help="trials per worker")
    parser.add_argument("--train", type=float, default=0.0, help="seconds each trial trains, on average")
    parser.add_argument(
        "--sampler", default="tpe", choices=SAMPLERS, help="random: no sampling work, the storage's share alone"
    )
    parser.add_argument("--storages", default="journal,journal-queued,optuna-journal,postgres,sqlite,sqlite-5s")
    args = parser.parse_args()
    kinds = args.storages.split(",")
    postgres = postgres_server() if "postgres" in kinds else None
    kinds = [k for k in kinds if k != "postgres" or postgres]
    pacing = f", trials of ~{args.train:g} s" if args.train else ""
    asked = args.workers * args.trials
    cores = os.cpu_count()
    shown = f"ask + tell, {args.sampler}{pacing}"
    print(f"{args.workers} workers x {args.trials} trials ({shown}), {asked} asked, {cores} cores")
    rows = []
    for kind in kinds:  # each row as soon as it is measured: a full run takes a while
        rows.append(run(kind, args.workers, args.trials, args.train, args.sampler, postgres))
        if len(rows) == 1:
            print("  ".join(f"{c:>13}" for c in rows[0]))
        print("  ".join(f"{v:>13.3f}" if isinstance(v, float) else f"{v:>13}" for v in rows[-1].values()), flush=True)
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
