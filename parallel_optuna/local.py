"""--local K: the study run on this machine by K worker processes, without SLURM."""

import signal
import subprocess
import sys

from parallel_optuna import PROJECT, study_control
from parallel_optuna.array_file import worker_flags
from parallel_optuna.export import export_best
from parallel_optuna.slurm import quote_command
from parallel_optuna.status import show_status
from parallel_optuna.study import (
    FINISHED,
    still_to_run,
    study_budget,
)


class LocalStop:
    """Ctrl-C of a local run: the first stops the workers at their next checkpoint, the second kills them."""

    def __init__(self, workers):
        self.workers, self.count = workers, 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.count += 1
        alive = [w for w in self.workers if w.poll() is None]
        if self.count == 1:
            print(
                "stopping: running trials checkpoint and end as interrupted (Ctrl-C again: stop at once)",
                file=sys.stderr,
            )
        for w in alive:
            if self.count == 1:
                w.send_signal(signal.SIGINT)
            else:
                w.kill()


def run_local(args, config, study, storage_file):
    """K worker processes on this machine, each running trials until the budget is met."""
    command = [sys.executable, str(PROJECT / "worker.py"), *worker_flags(config, storage_file), "--trials", "0"]
    print(f"running {args.local} local workers: {quote_command(command)}")
    first = len(study.get_trials(deepcopy=False))  # a resumed study gets new seeds, not the old ones again
    workers = [subprocess.Popen(command + ["--seed_offset", str(first + i)]) for i in range(args.local)]
    stop = LocalStop(workers)
    codes = [w.wait() for w in workers]
    if stop.count:
        print(
            "stopped; run the same command again to continue the interrupted trials from their checkpoints",
            file=sys.stderr,
        )
        return 130
    show_status(study, config)
    trials = study.get_trials(deepcopy=False)
    if any(t.state in FINISHED for t in trials):
        export_best(study, config, "")
    for w, code in zip(workers, codes, strict=True):
        if code < 0:  # killed from outside: it could say nothing, and its trial was retried like a dead task's
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            print(
                f"warning: local worker {w.pid} was killed ({name}); its trial was failed and retried", file=sys.stderr
            )
    if any(c > 1 for c in codes):
        return 1  # a worker ended on an error it has named itself (a bad config, a full disk)
    short = still_to_run(trials, study_budget(study, config))
    if short and not study_control.mark(study):  # the workers gave up: their trials kept failing
        print(
            f"error: {short} trial(s) of the budget did not finish; "
            "fix: see why above (make status), then run the same command again",
            file=sys.stderr,
        )
        return 1
    return 0
