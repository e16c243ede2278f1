"""Which of a trial's processes this one is (slurm.tasks_per_trial > 1), as torchrun would say it.

Every process of a trial gets torch's rendezvous variables (MASTER_ADDR, RANK, WORLD_SIZE, LOCAL_RANK) and
CHANNEL, the name of the folder its ranks share in runs/<study>/ranks/. Under SLURM, srun starts the
processes and worker.py sets these from SLURM's variables (rendezvous_env); under --local, the launcher
(local.py) starts them with these set (local_env). Everyone else reads rank() and world_size().
MASTER_PORT comes from rank 0 (free_port), which hands it to the others before any rank starts torch.
"""

import os
import re
import socket

from parallel_optuna.slurm import hostname

CHANNEL = "PARALLEL_OPTUNA_CHANNEL"  # set only in a process that is one of several of a trial
LOCAL_HOST = "127.0.0.1"


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, e.g. "gpu[01-03,07],login1" -> gpu01, gpu02, gpu03, gpu07, login1."""
    hosts = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", hostlist):
        hosts += _expand_one(item)
    return hosts


def _expand_one(item: str) -> list[str]:
    match = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if not match:
        return [item]
    prefix, ranges, rest = match.groups()
    names = []
    for part in ranges.split(","):
        low, _, high = part.partition("-")
        for number in range(int(low), int(high or low) + 1):
            names.append(f"{prefix}{number:0{len(low)}d}")  # keeps the zero padding: node01
    return [name + tail for name in names for tail in _expand_one(rest)]


def rendezvous_env(environ: dict) -> dict[str, str]:
    """The variables of this srun process, from SLURM's; {} for a task of one process, or for a process that
    --local started (it has them already)."""
    world = int(environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS") or 1)
    if world < 2 or "SLURM_PROCID" not in environ or CHANNEL in environ:
        return {}
    nodes = environ.get("SLURM_STEP_NODELIST") or environ["SLURM_JOB_NODELIST"]
    return {
        "MASTER_ADDR": expand_hostlist(nodes)[0],  # rank 0 runs on the step's first node; MASTER_PORT: free_port()
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        CHANNEL: f"{environ['SLURM_JOB_ID']}.{environ.get('SLURM_RESTART_COUNT', 0)}",  # a requeued task: a new one
    }


def local_env(rank: int, world: int, channel: str) -> dict[str, str]:
    """The variables of rank `rank` of a trial's `world` processes, all on this machine (--local)."""
    return {
        "MASTER_ADDR": LOCAL_HOST,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "LOCAL_RANK": str(rank),
        CHANNEL: channel,
    }


def local_channel(worker: int) -> str:
    """The channel of this launcher's local worker `worker` (--local): it names the launcher's host and pid."""
    return f"local-{hostname()}-{os.getpid()}-{worker}"


def local_launcher(channel: str) -> tuple[str, int] | None:
    """The host and pid of the --local launcher that started the ranks of this channel; None for an srun step's."""
    match = re.fullmatch(r"local-(.+)-(\d+)-\d+", channel)
    return (match[1], int(match[2])) if match else None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1)) if CHANNEL in os.environ else 1  # a stray WORLD_SIZE: not ours


def rank() -> int:
    return int(os.environ.get("RANK", 0)) if world_size() > 1 else 0


def free_port() -> int:
    """A TCP port free now on this host, picked by the kernel as torchrun --standalone does. Rank 0's torch
    binds it moments later; another process could take it meanwhile, and then init_process_group() fails."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]
