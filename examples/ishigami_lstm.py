"""The example experiment, baseline_LSTM_ishigami_cat: an LSTM regressing the Ishigami function.

y = sin(x1) + 7 sin^2(x2) + 0.1 x3^4 sin(x1),  x ~ U(-pi, pi)^3

The LSTM reads the three inputs as a sequence of 3 tokens; each token is its value concatenated
("cat") with a learned position embedding of size d_pos, so the LSTM input size d_in = 1 + d_pos
is derived from a sampled parameter. update_config() recomputes every derived dimension.

It is plugged in exactly as a user's trainer would be (`study.trainer: ishigami_lstm:train`):

    train(config, trial) -> {metric: value}

`config` is the resolved experiment config; `trial` is the worker's handle with
report(value, step), load_checkpoint(), save_checkpoint(state) and save_weights(state).
Training is k-fold cross-validation with the k models trained side by side, one epoch at a time,
so the mean validation metric over folds can be reported (and pruned on) after every epoch.
"""

import csv
import math
import os
import uuid
from pathlib import Path

import torch
from torch import nn

METRICS = ("val_mae_mean", "val_rmse_mean", "val_r2_mean")
DATA_FILE = "ishigami.csv"


def update_config(config):
    """Derived dimensions, recomputed from the sampled params for every trial."""
    model = config["model"]
    model["d_in"] = 1 + model["d_pos"]  # value token + position embedding
    model["d_head"] = 3 * model["d_hidden"]  # the head reads the LSTM output of all 3 tokens
    return config


def prepare(config):
    """Write the data set once, deterministically, into the experiment's data directory."""
    data = config["data"]
    path = Path(data["dir"]) / DATA_FILE
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(data.get("seed", 0))
    x = (torch.rand(data.get("n_samples", 1024), 3, generator=generator, dtype=torch.float64) * 2 - 1) * math.pi
    y = torch.sin(x[:, 0]) + 7 * torch.sin(x[:, 1]) ** 2 + 0.1 * x[:, 2] ** 4 * torch.sin(x[:, 0])
    partial = path.with_suffix(f".tmp{uuid.uuid4().hex}")  # concurrent writers, on any node, never mix bytes
    with partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["x1", "x2", "x3", "y"])
        writer.writerows([*row.tolist(), target.item()] for row, target in zip(x, y, strict=True))
    os.replace(partial, path)
    return path


def load_data(config):
    with (Path(config["data"]["dir"]) / DATA_FILE).open() as f:
        rows = [[float(v) for v in row] for row in list(csv.reader(f))[1:]]
    table = torch.tensor(rows, dtype=torch.float32)
    return table[:, :3], table[:, 3]


class IshigamiLSTM(nn.Module):
    def __init__(self, d_pos, d_in, d_hidden, n_layers, d_head):
        super().__init__()
        self.position = nn.Parameter(torch.randn(3, d_pos) * 0.1)
        self.lstm = nn.LSTM(d_in, d_hidden, num_layers=n_layers, batch_first=True)
        self.head = nn.Linear(d_head, 1)

    def forward(self, x):
        positions = self.position.expand(x.shape[0], -1, -1)
        tokens = torch.cat([x.unsqueeze(-1), positions], dim=-1)
        out, _ = self.lstm(tokens)
        return self.head(out.reshape(x.shape[0], -1)).squeeze(-1)


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def fold_indices(n, k, seed):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    folds = order.chunk(k)
    return [(torch.cat([f for j, f in enumerate(folds) if j != i]), folds[i]) for i in range(k)]


def scores(prediction, target):
    error = prediction - target
    mae = error.abs().mean().item()
    rmse = error.pow(2).mean().sqrt().item()
    r2 = 1 - error.pow(2).sum().item() / (target - target.mean()).pow(2).sum().item()
    return {"mae": mae, "rmse": rmse, "r2": r2}


def train(config, trial):
    model_cfg, train_cfg = config["model"], config["training"]
    device = pick_device(train_cfg.get("device", "auto"))
    torch.manual_seed(train_cfg.get("seed", 0))
    x, y = load_data(config)
    folds = fold_indices(len(y), train_cfg["k_folds"], train_cfg.get("seed", 0))
    dims = {k: model_cfg[k] for k in ("d_pos", "d_in", "d_hidden", "n_layers", "d_head")}
    models = [IshigamiLSTM(**dims).to(device) for _ in folds]
    optimizers = [torch.optim.Adam(m.parameters(), lr=train_cfg["lr"]) for m in models]

    start, metrics = 0, {}
    state = trial.load_checkpoint()
    if state:  # continue where the previous walltime (or worker) stopped
        start, metrics = state["epoch"], state.get("metrics", {})  # the last epoch's, if it was the last
        for model, saved in zip(models, state["models"], strict=True):
            model.load_state_dict(saved)
        for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        torch.set_rng_state(state["rng"])

    for epoch in range(start, train_cfg["epochs"]):
        runs = zip(models, optimizers, folds, strict=True)
        fold_scores = [fit_one_epoch(model, opt, x, y, fold, train_cfg, device) for model, opt, fold in runs]
        metrics = {
            f"val_{name}_mean": sum(s[name] for s in fold_scores) / len(fold_scores) for name in ("mae", "rmse", "r2")
        }
        metric = config["study"]["optimization_metric"]
        trial.report(metrics[metric if isinstance(metric, str) else metric[0]], epoch)  # the first of several
        trial.save_checkpoint(
            {
                "epoch": epoch + 1,
                "models": [m.state_dict() for m in models],
                "optimizers": [o.state_dict() for o in optimizers],
                "rng": torch.get_rng_state(),
                "metrics": metrics,
            }
        )
    trial.save_weights({"models": [m.state_dict() for m in models], "dims": dims})  # one model per fold
    metrics["device"] = str(device)
    return metrics


def fit_one_epoch(model, optimizer, x, y, fold, cfg, device):
    train_idx, val_idx = fold
    mean, std = y[train_idx].mean(), y[train_idx].std()  # standardized targets train faster
    model.train()
    for batch in train_idx[torch.randperm(len(train_idx))].split(cfg["batch_size"]):
        xb, yb = x[batch].to(device), ((y[batch] - mean) / std).to(device)
        loss = nn.functional.mse_loss(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        prediction = model(x[val_idx].to(device)).cpu() * std + mean
    return scores(prediction, y[val_idx])
