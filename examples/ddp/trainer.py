"""A DDP trainer written for torchrun, run unchanged with several processes per trial (docs/multi_gpu.md).

    study.trainer: trainer:train    slurm.tasks_per_trial: 2    (trainer.yaml beside this file)

Every process calls init_process_group() from torchrun's variables (MASTER_ADDR, RANK, WORLD_SIZE,
LOCAL_RANK), which the tool sets from SLURM's. Every rank calls trial.report() and trial.save_checkpoint()
at the same points: rank 0 reports to Optuna and writes the checkpoint, and every rank gets rank 0's
verdict (prune, stop for the walltime) at that same call, so all stop together.
An MLP learns y = sin(3 x1) x2 from data made in code; each rank trains on its own shard.
"""

import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

METRICS = ("val_loss", "world_size")


def setup():
    """torchrun-style: the process group from the environment; NCCL on GPUs, gloo on CPUs."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def make_data(n_samples, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n_samples, 2, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * x[:, 1:] + 0.1 * torch.randn(n_samples, 1, generator=g)
    split = n_samples * 3 // 4
    return (x[:split], y[:split]), (x[split:], y[split:])


def train(config, trial):
    device = setup()
    rank, world = dist.get_rank(), dist.get_world_size()
    settings = config["training"]
    torch.manual_seed(settings["seed"])  # the same initial weights on every rank
    (x, y), (x_val, y_val) = make_data(settings["n_samples"])
    x, y = x[rank::world].to(device), y[rank::world].to(device)  # this rank's shard
    model = nn.Sequential(nn.Linear(2, config["model"]["width"]), nn.Tanh(), nn.Linear(config["model"]["width"], 1))
    model = DistributedDataParallel(model.to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=settings["lr"])
    state = trial.load_checkpoint() or {"epoch": 0}  # every rank resumes from rank 0's checkpoint
    if "model" in state:
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    for epoch in range(state["epoch"], settings["epochs"]):
        for batch in torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch)).split(64):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x[batch]), y[batch]).backward()  # DDP averages the gradients
            optimizer.step()
        time.sleep(settings.get("epoch_seconds", 0))  # a stand-in for a longer epoch
        with torch.no_grad():
            val_loss = nn.functional.mse_loss(model(x_val.to(device)), y_val.to(device)).item()
        trial.report(val_loss, epoch)  # rank 0's pruning decision, on every rank
        state = {"epoch": epoch + 1, "val_loss": val_loss}
        state.update(model=model.module.state_dict(), optimizer=optimizer.state_dict())
        trial.save_checkpoint(state)  # written by rank 0; after a walltime signal every rank stops here
    trial.save_weights(model.module.state_dict())
    return {"val_loss": state["val_loss"], "world_size": world}
