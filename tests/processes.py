"""Small programs the tests start as processes of their own (a lock holder to kill, a writer to race):

python tests/processes.py append_ops JOURNAL WORKER_ID COUNT      # append COUNT ops, queued lock
python tests/processes.py hold_lock JOURNAL queued|open           # print "locked", release on a line
python tests/processes.py hold_lock_forever JOURNAL               # Optuna's open lock, never released
python tests/processes.py hold_study JOURNAL                      # print "open", close the storage on a line
python tests/processes.py without MODULE SCRIPT ARGS...           # run SCRIPT as if MODULE were missing
"""

import os
import runpy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optuna.storages.journal import JournalFileOpenLock  # noqa: E402

from parallel_optuna.storage import journal, journal_lock  # noqa: E402


def append_ops(path, worker_id, count):
    backend = journal.JournalFile(path, journal_lock.JournalLock(path))
    for i in range(int(count)):
        backend.append_logs([{"op_code": 8, "worker_id": worker_id, "trial_id": 0, "user_attr": {"i": i}}])


def hold_lock(path, kind):
    lock = journal_lock.JournalLock(path) if kind == "queued" else JournalFileOpenLock(path)
    lock.acquire()
    print("locked", flush=True)
    sys.stdin.readline()
    lock.release()


def hold_lock_forever(path):
    JournalFileOpenLock(path).acquire()
    print("locked", flush=True)
    time.sleep(600)


def hold_study(path):
    storage = journal.open_journal(path)  # as a worker between trials, status or the dashboard has it
    print("open", flush=True)
    sys.stdin.readline()
    journal.close(storage)


def without(module, script, *args):
    sys.modules[module] = None  # `import module` now raises ImportError, as when it is not installed
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(script))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    name, *arguments = sys.argv[1:]
    programs = {"append_ops": append_ops, "hold_lock": hold_lock, "hold_lock_forever": hold_lock_forever}
    programs.update(hold_study=hold_study, without=without)
    programs[name](*arguments)
