"""--local K: the study run on this machine by K worker processes, without SLURM.

With slurm.tasks_per_trial N > 1 each local worker is N processes, the ranks of one trial at a time, started
with the variables srun's would get (rendezvous.local_env) and ended together as srun --kill-on-bad-exit=1
ends an array task's.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

from parallel_optuna import PROJECT, ranks, rendezvous, study_control
from parallel_optuna.array_file import worker_flags
from parallel_optuna.export import export_best
from parallel_optuna.options import ConfigError
from parallel_optuna.slurm import quote_command
from parallel_optuna.status import show_status
from parallel_optuna.study import (
    FINISHED,
    still_to_run,
    study_budget,
)

POLL_S = 0.1  # how often the launcher looks for a rank that ended


def check_local(args, config) -> None:
    """What --local K refuses, before a file is written or a study created."""
    if args.local < 1:
        raise ConfigError("--local", "local", f"{args.local} workers", "pass --local 1 or more")
    nodes = config["slurm"]["nodes_per_trial"]
    if nodes > 1:
        source = "--nodes_per_trial" if "nodes_per_trial" in config.overrides else config.path
        fix = "set slurm.nodes_per_trial: 1 to run the trial's processes here, or submit to SLURM without --local"
        raise ConfigError(
            source, "slurm.nodes_per_trial", f"{nodes} nodes per trial: --local runs on this machine", fix
        )


class Worker:
    """One local worker: its process, or its trial's N processes (rank 0 first, the one that opens the study)."""

    def __init__(self, command: list[str], world: int, channel: str, gpus: str | None) -> None:
        # Without SLURM's variables: run inside a batch job, each worker would take itself for a rank of that job,
        # or all of them for one array task (the same task key: each would resume that task's trial).
        env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus  # its own GPUs; rank r takes the r-th of them, as under srun
        if world == 1:
            self.ranks = [subprocess.Popen(command, env=env)]
        else:
            self.ranks = [
                subprocess.Popen(command, env={**env, **rendezvous.local_env(rank, world, channel)})
                for rank in range(world)
            ]
        self.channel = channel
        self.ended_by: tuple[int, int] | None = None  # (rank, exit status) of the first rank that ended non-zero

    def running(self) -> bool:
        """Whether a rank still runs. One that ended non-zero ends the others at once: they may wait for it in a
        collective. Killed, not TERMed as srun does first: a local rank 0 that gets TERM fails its trial as
        stopped by hand; killed, the trial is a dead worker's, failed once and retried as under SLURM."""
        codes = [p.poll() for p in self.ranks]
        bad = [(rank, code) for rank, code in enumerate(codes) if code not in (None, 0)]
        if bad and self.ended_by is None:
            self.ended_by = min(bad, key=lambda rank_code: rank_code[1])  # a signal (< 0) first: it says why
            for p in self.ranks:
                if p.poll() is None:
                    p.kill()
        return None in codes

    def status(self) -> int:
        return self.ended_by[1] if self.ended_by else 0

    def name(self) -> str:
        worker = f"local worker {self.ranks[0].pid}"  # the pid its trials record
        return f"rank {self.ended_by[0]} of {worker}" if len(self.ranks) > 1 and self.ended_by else worker


class LocalStop:
    """Ctrl-C of a local run: the first stops the workers at their next checkpoint, the second kills them."""

    def __init__(self, workers: list[Worker]) -> None:
        self.workers, self.count = workers, 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, frame):
        self.count += 1
        alive = [p for w in self.workers for p in w.ranks if p.poll() is None]
        if self.count == 1:
            print(
                "stopping: running trials checkpoint and end as interrupted (Ctrl-C again: stop at once)",
                file=sys.stderr,
            )
        for p in alive:  # ranks other than 0 stop where rank 0 tells them to
            if self.count == 1:
                p.send_signal(signal.SIGINT)
            else:
                p.kill()


def start_workers(args, config, study, storage_file) -> list[Worker]:
    command = [sys.executable, str(PROJECT / "worker.py"), *worker_flags(config, storage_file), "--trials", "0"]
    world = config["slurm"]["tasks_per_trial"]
    each = f", {world} processes each (slurm.tasks_per_trial)" if world > 1 else ""
    print(f"running {args.local} local workers{each}: {quote_command(command)}")
    first = len(study.get_trials(deepcopy=False))  # a resumed study gets new seeds, not the old ones again
    channels = [rendezvous.local_channel(i) for i in range(args.local)]
    for name in channels if world > 1 else ():  # a killed launcher of the same pid left them: its trial.json is stale
        shutil.rmtree(ranks.channel(config, name), ignore_errors=True)
    gpus = gpu_slices(args.local, world * config["slurm"]["gpus_per_task"])
    return [
        Worker(command + ["--seed_offset", str(first + i)], world, name, gpus[i]) for i, name in enumerate(channels)
    ]


def gpu_slices(workers: int, per_worker: int) -> list[str | None]:
    """Each local worker's CUDA_VISIBLE_DEVICES: its own GPUs of this machine's where there are enough for every
    worker; else None for each (the workers share the GPUs they see, said once)."""
    gpus = visible_gpus() if per_worker else []
    if gpus and len(gpus) >= workers * per_worker:
        slices = [",".join(gpus[i * per_worker : (i + 1) * per_worker]) for i in range(workers)]
        print(f"GPUs of the local workers: {' | '.join(slices)} (CUDA_VISIBLE_DEVICES)")
        return slices
    if gpus:
        print(f"{workers} local workers of {per_worker} GPU(s) each share this machine's {len(gpus)} GPU(s)")
    return [None] * workers


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA numbers them: CUDA_VISIBLE_DEVICES where it is set, else nvidia-smi's list."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [gpu.strip() for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    try:
        found = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return []  # no NVIDIA driver: CPUs only
    return found.stdout.split() if found.returncode == 0 else []


def wait_for(workers: list[Worker], config) -> None:
    while [w for w in workers if w.running()]:  # every worker looked at, each time
        time.sleep(POLL_S)
    for w in workers:
        if len(w.ranks) > 1:  # rank 0 deletes it once every rank left; not where a rank died
            shutil.rmtree(ranks.channel(config, w.channel), ignore_errors=True)


def run_local(args, config, study, storage_file):
    """K workers on this machine, each running trials until the budget is met."""
    workers = start_workers(args, config, study, storage_file)
    stop = LocalStop(workers)
    wait_for(workers, config)
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
    for w in workers:
        code = w.status()
        if code < 0:  # killed from outside: it could say nothing, and its trial was retried like a dead task's
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            print(f"warning: {w.name()} was killed ({name}); its trial was failed and retried", file=sys.stderr)
    if any(w.status() > 1 for w in workers):
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
