# Parallel Optuna. `make help` lists the targets.
# Pick the experiment with CONFIG=path/to.yaml or EXP=<exp_id> (experiments/<exp_id>/config.yaml);
# STUDY=name overrides its study name; ARGS="--n_trials 50 --walltime 2-00:00:00" passes more flags.
CONFIG ?= config.example.yaml
EXP ?=
STUDY ?=
ARGS ?=
PORT ?= 8080
FULL ?=
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
COMMA := ,
WHICH := $(if $(EXP),--exp_id $(EXP),--config $(CONFIG)) $(if $(STUDY),--study_name $(STUDY))

K ?=

.PHONY: help venv demo submit submit-job dry-run status best report dashboard doctor throttle pause resume cancel cluster test lint bench clean
help:
	@echo "make demo      virtualenv + a real study of the example with 2 local workers, then best_trial.yaml"
	@echo "make test      the whole test suite (starts the local SLURM cluster and PostgreSQL when run as root)"
	@echo "make submit    submit the study as a SLURM job array   (CONFIG=... | EXP=..., STUDY=..., ARGS=...)"
	@echo "make submit-job  the same, from a small job (1 CPU, 4G, 1 h): nothing heavy on the login node"
	@echo "make dry-run   write and print the array file, submit nothing"
	@echo "make status    trials by state, budget, best so far, running trials and SLURM tasks"
	@echo "make best      write best_trial.yaml and the best trial's weights best_trial.pt"
	@echo "make report    plots of the study as PNGs in runs/<study>/report/ (needs matplotlib)"
	@echo "make dashboard optuna-dashboard on 127.0.0.1, PORT=8080, read-only; prints the ssh -L line for your laptop"
	@echo "make doctor    check the storage (torn journal lines, stale lock, trials without a worker) and repair it"
	@echo "make throttle K=2   at most K tasks of the study at once, from now on (later submits keep it)"
	@echo "make pause     hold the queued tasks; running trials finish, no new trial starts"
	@echo "make resume    release a paused study"
	@echo "make cancel    stop the study now; trials checkpoint and end as cancelled; make submit continues them"
	@echo "make cluster   start a single-node SLURM cluster on this machine (root, Debian)"
	@echo "make bench     storage, status, study-size, makespan, overhead, start, sampler-quality and artifact-cost benchmarks, quick (FULL=1: full sizes)"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-extras.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	touch $@

demo: venv
	$(PY) submit_study.py $(WHICH) --local 2 $(ARGS)

submit: venv
	$(PY) submit_study.py $(WHICH) $(ARGS)

submit-job: venv
	$(PY) submit_study.py $(WHICH) --as_job $(ARGS)

dry-run: venv
	$(PY) submit_study.py $(WHICH) --no-submit_jobs $(ARGS)

status: venv
	@$(PY) submit_study.py $(WHICH) --status $(ARGS)

best: venv
	$(PY) submit_study.py $(WHICH) --export_best $(ARGS)

doctor: venv
	$(PY) submit_study.py $(WHICH) --check_storage --repair $(ARGS)

report: venv
	$(PY) submit_study.py $(WHICH) --report $(ARGS)

dashboard: venv
	$(PY) submit_study.py $(WHICH) --dashboard $(PORT) $(ARGS)

throttle: venv
	@test -n "$(K)" || { echo "make throttle needs K=<tasks at once>, e.g. make throttle K=2"; exit 2; }
	$(PY) submit_study.py $(WHICH) --throttle $(K) $(ARGS)

pause resume cancel: venv
	$(PY) submit_study.py $(WHICH) --$@ $(ARGS)

cluster:
	bash scripts/local_cluster.sh up

test: venv
	@bash scripts/local_cluster.sh up || echo "no local SLURM cluster here: the SLURM tests skip (and fail when CI=true)"
	@bash scripts/local_postgres.sh up >/dev/null || echo "no local PostgreSQL here: its tests skip (and fail when CI=true)"
	$(PY) -m pytest -q -n 2 --dist loadgroup $(ARGS)

lint: venv
	$(VENV)/bin/ruff check .

# Quick by default; FULL=1 for the sizes in bench/README.md's table.
bench: venv
	@bash scripts/local_cluster.sh up || echo "no local SLURM cluster here: the makespan bench cannot run"
ifeq ($(FULL),1)
	nice $(PY) bench/storage_bench.py --workers 256 --trials 10 --storages journal,postgres,sqlite
	$(PY) bench/status_bench.py --sizes 100,1000,5000
	nice $(PY) bench/storage_bench.py --workers 256 --trials 10 --sampler random --storages journal,journal-flush-every-op,optuna-journal,journal-queued
	nice $(PY) bench/storage_bench.py --workers 256 --trials 10 --storages journal,journal-flush-every-op,journal-queued,optuna-journal
	nice $(PY) bench/storage_bench.py --workers 256 --trials 10 --train 2 --storages journal,optuna-journal,journal-queued
	$(PY) bench/scale_bench.py --full
	$(PY) bench/makespan_bench.py --repeats 3
	$(PY) bench/makespan_bench.py --trials 40 --seconds 1 --limit 4 --packing 1,10 --repeats 3
	$(PY) bench/makespan_bench.py --trials 200 --seconds 1 --limit 4 --packing 1,10 --repeats 3
	$(PY) bench/overhead_bench.py --sizes 0,100 --repeats 3
	nice $(PY) bench/start_bench.py --workers 32 --sizes 100,400 --running 0,32,128,255 --modes this,nohurry,none
	$(PY) bench/topup_quality.py --problem hartmann6 --size 20 --k 64 --seeds 10
	$(PY) bench/topup_quality.py --problem mixed --size 40 --k 64 --seeds 10
	$(PY) bench/quality.py
	$(PY) bench/artifact_cost.py --trials 8
else
	$(PY) bench/storage_bench.py --workers 16 --trials 10
	$(PY) bench/status_bench.py --sizes 100,1000
	$(PY) bench/scale_bench.py
	$(PY) bench/makespan_bench.py
	$(PY) bench/overhead_bench.py --sizes 0 --repeats 1
	$(PY) bench/start_bench.py --workers 4 --sizes 0 --running 0
	$(PY) bench/topup_quality.py --size 12 --k 4 --seeds 1
	$(PY) bench/quality.py --quick
	$(PY) bench/artifact_cost.py
endif

clean:
	rm -rf runs data best_trial.yaml .pytest_cache
