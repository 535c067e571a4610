# make setup | run | smoke | readme | test | lint        (N=<cores>, default: nproc)
SHELL := /bin/bash
N ?= $(shell nproc)
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
SNAKEFLAGS ?=
# Snakemake with the project profile (workflow/profiles/default: rerun-incomplete, keep-going, latency-wait) and
# a stale lock of a killed run removed: after Ctrl-C, kill or kill -9, the same command finishes the grid
RUN := $(PY) workflow/scripts/run.py

.PHONY: setup run smoke readme baselines test lint dry-run clean-smoke

setup:
	REX_VENV=$(VENV) bash workflow/scripts/setup.sh

# the embedded default grid (conf/grid/default.yaml) -> results/{summary.csv,tables,plots,report.md,mlflow.db}
run: setup
	$(RUN) --cores $(N) $(SNAKEFLAGS)

# a handful of jobs in results/smoke/ (< 2 min on 2 cores)
smoke: setup
	$(RUN) --cores $(N) --configfile conf/grid/smoke.yaml $(SNAKEFLAGS)

# the baselines table (results/tables/baselines_mobilenet_v2.md; about an hour on 2 cores): a rule of the DAG,
# not in `make run` (the target comes first: --configfile in SNAKEFLAGS takes every name after it)
baselines: setup
	$(RUN) baselines --cores $(N) $(SNAKEFLAGS)

# README.md's generated results section <- results/ (tables, jobs.csv, bench): never copied by hand
readme: setup
	$(PY) -m rex.pipeline.readme --results results --readme README.md

test: setup
	$(PY) -m pytest -q

# snakemake's linter on the workflow, the JSON-schema check of every grid (snakemake -n), python syntax
lint:
	$(PY) workflow/scripts/check_lint.py
	@for g in conf/grid/*.yaml; do \
	  echo "dry-run $$g"; $(SNAKEMAKE) -n -q --cores 1 --configfile "$$g" --config results_dir=/tmp/rex-lint-$$$$ >/dev/null || exit 1; \
	done
	$(PY) -m compileall -q rex workflow/scripts tests

dry-run:
	$(RUN) -n --cores $(N) $(SNAKEFLAGS)

clean-smoke:
	rm -rf results/smoke
