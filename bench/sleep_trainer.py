"""A trainer for bench/makespan_bench.py: it only sleeps, so the array's time is SLURM's and the tool's."""

import time

METRICS = ("loss",)


def train(config, trial):
    time.sleep(config["training"]["seconds"])
    return {"loss": config["model"]["x"]}  # the sampled value, resolved into the config
