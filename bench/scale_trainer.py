"""A 0 s trainer for bench/scale_bench.py: ten reports and a metric, no heavy imports.

It leaves in the journal what a real trainer leaves there (the worker's attributes, one report
per epoch, the tell) while the run costs only the worker's own start-up, load and bookkeeping.
"""

METRICS = ("val_mae_mean",)


def train(config, handle):
    x = config["model"]["x"]
    for step in range(10):
        handle.report(x + 1.0 / (step + 1), step)
    return {"val_mae_mean": x}
