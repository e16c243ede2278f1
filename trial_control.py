"""`import trial_control` in a plain objective: the module `parallel_optuna.trial_control`, by its short name."""

import sys

from parallel_optuna import trial_control

sys.modules[__name__] = trial_control
