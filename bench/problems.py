"""Benchmark problems for bench/quality.py, plugged in as trainers exactly like a user's would be.

Each trainer sleeps `bench.sleep` seconds (so K trials overlap as they would on K GPUs) and returns
{"value": what Optuna sees, "true_value": the noiseless value}. Regret is true_value - OPTIMUM.
The short real training (the example LSTM) lives in examples/ishigami_lstm.py and has no known optimum.
"""

import math
import random
import time

METRICS = ("value", "true_value")

# Hartmann-6 on [0, 1]^6 (Surjanovic & Bingham), minimum -3.32237.
ALPHA = (1.0, 1.2, 3.0, 3.2)
A = (
    (10, 3, 17, 3.5, 1.7, 8),
    (0.05, 10, 17, 0.1, 8, 14),
    (3, 3.5, 1.7, 10, 17, 8),
    (17, 8, 0.05, 10, 0.1, 14),
)
P = (
    (0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886),
    (0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991),
    (0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650),
    (0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381),
)
OPTIMUM = {"hartmann6": -3.32237, "styblinski_tang": -39.16617 * 4, "mixed": 0.0}


def hartmann6(x):
    return -sum(ALPHA[i] * math.exp(-sum(A[i][j] * (x[j] - P[i][j]) ** 2 for j in range(6))) for i in range(4))


def styblinski_tang(x):
    """Multimodal, 2^d local minima; minimum -39.16617 d at x_i = -2.903534."""
    return sum(v**4 - 16 * v**2 + 5 * v for v in x) / 2


def mixed(p):
    """A stand-in for a training run's validation loss over a space like the example's: log lr, int, categorical.

    Minimum 0 at lr = 10^-2.5, d_pos = 10, d_hidden = 64, n_layers = 2, dropout = 0.1, batch_size = 64;
    the best lr depends on the batch size and the depth, as it does in real training.
    """
    best_log_lr = -2.5 + 0.5 * math.log2(p["batch_size"] / 64) - 0.25 * (p["n_layers"] - 2)
    return (
        (math.log10(p["lr"]) - best_log_lr) ** 2
        + ((p["d_pos"] - 10) / 6) ** 2
        + {16: 0.4, 32: 0.15, 64: 0.0, 128: 0.1}[p["d_hidden"]]
        + 0.1 * (p["n_layers"] - 2) ** 2
        + 4 * (p["dropout"] - 0.1) ** 2
        + {32: 0.05, 64: 0.0, 128: 0.05, 256: 0.2}[p["batch_size"]]
    )


def _finish(config, true_value, noise=0.0):
    time.sleep(config["bench"]["sleep"])
    rng = random.Random(f"{config['bench'].get('noise_seed', 0)}-{sorted(config['x'].items())}-{time.time_ns()}")
    return {"value": true_value + rng.gauss(0, noise) if noise else true_value, "true_value": true_value}


def train_hartmann6(config, trial):
    return _finish(config, hartmann6([config["x"][f"x{i}"] for i in range(6)]))


def train_styblinski_tang(config, trial):
    """Noisy: Gaussian noise of sd bench.noise on every evaluation (a repeat gives a different value)."""
    return _finish(config, styblinski_tang([config["x"][f"x{i}"] for i in range(4)]), config["bench"]["noise"])


def train_mixed(config, trial):
    return _finish(config, mixed(config["x"]))
