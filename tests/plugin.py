"""Test trainer: the example, or a slow stand-in (training.sleep per epoch).

With training.misbehave, the enqueued lr 0.01 (never sampled exactly) with d_pos 2 raises, with 4 reports NaN;
with training.broken, every trial raises; training.grow_mb allocates that much memory, 50 MB at a time;
training.hang sleeps that many seconds and never reports nor checkpoints.
"""

import os
import pathlib
import time

import yaml

from examples import ishigami_lstm
from examples.ishigami_lstm import METRICS, prepare, update_config  # noqa: F401 (the tool looks for them in this module)


def train(config, trial):
    if config["training"].get("broken"):  # every config fails the same way, as with a bug in the trainer
        raise KeyError("no column 'target' in the data")
    misuse_resources(config["training"])
    d_pos = config["model"]["d_pos"]
    misbehave = config["training"].get("misbehave") and config["training"]["lr"] == 0.01
    if misbehave and d_pos == 2:
        raise RuntimeError("boom: the trainer crashed")
    if misbehave and d_pos == 4:
        trial.report(float("nan"), 0)
    if config["training"].get("edit_yaml_to"):  # edit the experiment YAML on disk mid-study
        path = pathlib.Path(__file__).with_name("config.yaml")  # the experiment beside this module
        data = yaml.safe_load(path.read_text())
        data["model"]["d_hidden"] = config["training"]["edit_yaml_to"]
        data["training"]["edit_yaml_to"] = None  # a YAML that drops keys is not adopted mid-study
        path.write_text(yaml.safe_dump(data))
    if config["training"].get("sleep"):
        epochs, sleep = config["training"]["epochs"], config["training"]["sleep"]
        fine = config["training"].get("fine_steps_on_array_id")  # the same time, in finer steps, on that task
        if fine and os.environ.get("SLURM_JOB_ID") == os.environ.get("SLURM_ARRAY_JOB_ID", "-"):
            epochs, sleep = epochs * fine, sleep / fine
        state = trial.load_checkpoint() or {"epoch": 0}
        for epoch in range(state["epoch"], epochs):
            time.sleep(sleep)
            trial.report(1.0 / (epoch + 1), epoch)
            trial.save_checkpoint({"epoch": epoch + 1})
        return {"val_mae_mean": 0.5, "val_rmse_mean": 0.5, "val_r2_mean": 0.5}
    return ishigami_lstm.train(config, trial)


def misuse_resources(training):
    """What SLURM kills a task for: memory past its request, time past its walltime."""
    chunks = []
    while len(chunks) * 50 < training.get("grow_mb", 0):  # the cgroup kills the task on the way
        chunks.append(b"\1" * (50 << 20))  # bytes that are written, so they count in the RSS
        time.sleep(0.5)  # slow enough for accounting to sample the RSS on the way up
    time.sleep(training.get("hang", 0))
