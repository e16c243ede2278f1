"""A plain Optuna objective for several processes, as in optuna-examples' pytorch_distributed_simple.py.

    study.objective: objective:objective    slurm.tasks_per_trial: 2    (objective.yaml beside this file)

Rank 0 gets the Optuna trial; the tool calls the objective on the other ranks with trial=None, once per
trial of rank 0, and ends them when the task runs no more trials. optuna-integration's
TorchDistributedTrial hands rank 0's suggestions, reports and pruning decisions to every rank
(pip install optuna-integration==5.0.0). trial_control.stop_requested() gives every rank rank 0's answer.
"""

import os
import sys
from pathlib import Path

import optuna
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.append(str(Path(__file__).resolve().parents[2]))  # trial_control, when run outside the tool
import trial_control  # noqa: E402

EPOCHS, N_SAMPLES = 10, 2048


def objective(single_trial):
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")  # torchrun's variables
    from optuna_integration import TorchDistributedTrial

    trial = TorchDistributedTrial(single_trial)  # None on ranks other than 0
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    if torch.cuda.is_available():
        torch.cuda.set_device(device)  # NCCL's collectives use the current device
    width, lr = trial.suggest_int("width", 8, 64, log=True), trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(N_SAMPLES, 2, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * x[:, 1:]
    torch.manual_seed(0)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, 1)).to(device))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    checkpoint = trial_control.trial_dir(single_trial) / "checkpoint.pt" if rank == 0 else None
    start = resume(model, optimizer, checkpoint)
    train_x, train_y = x[: N_SAMPLES * 3 // 4][rank::world].to(device), y[: N_SAMPLES * 3 // 4][rank::world].to(device)
    val_x, val_y = x[N_SAMPLES * 3 // 4 :].to(device), y[N_SAMPLES * 3 // 4 :].to(device)
    for epoch in range(start, EPOCHS):
        for batch in torch.randperm(len(train_x)).split(64):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(train_x[batch]), train_y[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            val_loss = nn.functional.mse_loss(model(val_x), val_y).item()
        trial.report(val_loss, epoch)
        if trial.should_prune():  # rank 0's decision on every rank
            raise optuna.TrialPruned()
        if trial_control.stop_requested():  # rank 0's answer on every rank: all stop at this epoch
            if rank == 0:
                state = {"epoch": epoch + 1, "model": model.module.state_dict(), "optimizer": optimizer.state_dict()}
                torch.save(state, checkpoint)
            raise trial_control.Stop()
    return val_loss


def resume(model, optimizer, checkpoint):
    """Rank 0's checkpoint of this trial (a walltime requeue, a retry), on every rank; the epoch to start at."""
    state = [
        torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint and checkpoint.exists() else None
    ]
    dist.broadcast_object_list(state, src=0)  # the model and Adam's moments must be the same on every rank
    if state[0] is None:
        return 0
    model.module.load_state_dict(state[0]["model"])
    optimizer.load_state_dict(state[0]["optimizer"])
    if dist.get_rank() == 0:
        print(f"resuming from {checkpoint} at epoch {state[0]['epoch']}", flush=True)
    return state[0]["epoch"]


if __name__ == "__main__":  # plain Optuna: torchrun --nproc_per_node 2 examples/ddp/objective.py
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        optuna.create_study().optimize(objective, n_trials=4)
    else:
        for _ in range(4):
            try:
                objective(None)
            except optuna.TrialPruned:
                pass
