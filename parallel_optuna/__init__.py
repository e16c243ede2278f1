"""Parallel Optuna's machinery, behind its two scripts: submit_study.py (the command line), worker.py (a trial).

One module per concept; `docs/architecture.md` says which module owns which truth.
"""

from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent  # the folder of submit_study.py, worker.py, array_job.sbatch
