"""Parallel Optuna's machinery, behind its two scripts: submit_study.py (the command line), worker.py (a trial).

One module per concept; `docs/architecture.md` says which module owns which truth.
"""
