# Parallel Optuna. `make help` lists the targets.
# Pick the experiment with CONFIG=path/to.yaml or EXP=<exp_id> (experiments/<exp_id>/config.yaml);
# STUDY=name overrides its study name; ARGS="--n_trials 50 --walltime 2-00:00:00" passes more flags.
CONFIG ?= config.example.yaml
EXP ?=
STUDY ?=
ARGS ?=
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
COMMA := ,
WHICH := $(if $(EXP),--exp_id $(EXP),--config $(CONFIG)) $(if $(STUDY),--study_name $(STUDY))

.PHONY: help venv demo submit dry-run status best doctor cluster test lint bench clean
help:
	@echo "make demo      virtualenv + a real study of the example with 2 local workers, then best_trial.yaml"
	@echo "make test      the whole test suite (starts the local SLURM cluster when run as root)"
	@echo "make submit    submit the study as a SLURM job array   (CONFIG=... | EXP=..., STUDY=..., ARGS=...)"
	@echo "make dry-run   write and print the array file, submit nothing"
	@echo "make status    trials by state, budget, best so far, running trials and SLURM tasks"
	@echo "make best      write best_trial.yaml (retrain: python worker.py --config best_trial.yaml)"
	@echo "make doctor    check the storage (torn journal lines, stale lock, trials without a worker) and repair it"
	@echo "make cluster   start a single-node SLURM cluster on this machine (root, Debian)"
	@echo "make bench     storage, status-at-scale and study-size benchmarks (bench/README.md; FULL=1: full sizes)"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

demo: venv
	$(PY) submit_study.py $(WHICH) --local 2 $(ARGS)

submit: venv
	$(PY) submit_study.py $(WHICH) $(ARGS)

dry-run: venv
	$(PY) submit_study.py $(WHICH) --no-submit_jobs $(ARGS)

status: venv
	@$(PY) submit_study.py $(WHICH) --status $(ARGS)

best: venv
	$(PY) submit_study.py $(WHICH) --export_best $(ARGS)

doctor: venv
	$(PY) submit_study.py $(WHICH) --check_storage --repair $(ARGS)

cluster:
	bash scripts/local_cluster.sh up

test: venv
	@bash scripts/local_cluster.sh up || echo "no local SLURM cluster here: the SLURM tests skip (and fail when CI=true)"
	$(PY) -m pytest -q $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .

# FULL=1: full sizes (a 100,000-trial study, 256 concurrent workers): tens of minutes on 2 cores.
bench: venv
	$(PY) bench/storage_bench.py --workers 16 --trials 10
	$(PY) bench/status_bench.py
	$(PY) bench/scale_bench.py $(if $(FULL),--full)
	$(if $(FULL),$(PY) bench/storage_bench.py --workers 256 --trials 10 --storages journal$(COMMA)journal-queued$(COMMA)optuna-journal)

clean:
	rm -rf runs data best_trial.yaml .pytest_cache
