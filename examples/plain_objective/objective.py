"""A plain Optuna objective, unchanged: an MLP learns a noisy 2-D function, with pruning.

    python examples/plain_objective/objective.py                       # plain Optuna: study.optimize here
    make demo CONFIG=examples/plain_objective/config.yaml              # the same objective, 2 local workers
    make submit CONFIG=examples/plain_objective/config.yaml            # the same objective, a SLURM array

The data is generated in code (no downloads). Under Parallel Optuna the objective also survives a
walltime: it saves a checkpoint in its trial's folder when trial_control.stop_requested() says so,
and the requeued task continues the same trial from there. Under plain Optuna those calls do nothing.
"""

import math
import sys
from pathlib import Path

import optuna
import torch
from torch import nn

sys.path.append(str(Path(__file__).resolve().parents[2]))  # trial_control, when run outside the tool
import trial_control  # noqa: E402

EPOCHS = 20
N_SAMPLES = 2048
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # under SLURM: the task's own GPU


def make_data(seed=0):
    """y = sin(3 x1) * x2 + 0.1 noise, for x in [-1, 1]^2; 75% train, 25% validation."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(N_SAMPLES, 2, generator=g) * 2 - 1
    y = torch.sin(3 * x[:, :1]) * x[:, 1:] + 0.1 * torch.randn(N_SAMPLES, 1, generator=g)
    cut = N_SAMPLES * 3 // 4
    x, y = x.to(DEVICE), y.to(DEVICE)
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def make_model(trial):
    layers, width = [], 2
    for i in range(trial.suggest_int("n_layers", 1, 3)):
        hidden = trial.suggest_int(f"n_units_l{i}", 8, 64, log=True)
        layers += [nn.Linear(width, hidden), nn.Tanh()]
        width = hidden
    return nn.Sequential(*layers, nn.Linear(width, 1))


def objective(trial):
    torch.manual_seed(0)  # one seed for every trial: a retrain of the best trial (a new trial number) reproduces it
    model = make_model(trial).to(DEVICE)
    lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    (x_train, y_train), (x_val, y_val) = make_data()
    checkpoint = trial_control.trial_dir(trial) / "checkpoint.pt"
    start, val_loss = 0, None
    if checkpoint.exists():  # a requeued or retried trial goes on where it stopped
        state = torch.load(checkpoint, map_location=DEVICE, weights_only=True)  # data only: no code runs
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, val_loss = state["epoch"], state["val_loss"]  # the loss too: the stop may have come in the last epoch
    for epoch in range(start, EPOCHS):
        model.train()
        for batch in torch.randperm(len(x_train), device=DEVICE).split(128):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x_train[batch]), y_train[batch]).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            val_loss = nn.functional.mse_loss(model(x_val), y_val).item()
        if not math.isfinite(val_loss):
            raise ValueError(f"validation loss is {val_loss} at epoch {epoch}")
        trial.report(val_loss, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()
        if trial_control.stop_requested():  # the walltime is near: save, and the trial goes on after the requeue
            state = {
                "epoch": epoch + 1,
                "val_loss": val_loss,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
            }
            torch.save(state, checkpoint)
            raise trial_control.Stop()
    return val_loss


if __name__ == "__main__":
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    study.optimize(objective, n_trials=10)
    print(f"best val_loss {study.best_value:.4f} with {study.best_params}")
