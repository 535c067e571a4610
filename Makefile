# make setup | run | smoke | test | lint        (N=<cores>, default: nproc)
SHELL := /bin/bash
N ?= $(shell nproc)
VENV ?= .venv
PY := $(VENV)/bin/python
SNAKEMAKE := $(VENV)/bin/snakemake
SNAKEFLAGS ?=

.PHONY: setup run smoke test lint dry-run clean-smoke

setup:
	bash workflow/scripts/setup.sh

# the embedded default grid (conf/grid/default.yaml) -> results/{summary.csv,tables,plots,report.md,mlflow.db}
run: setup
	$(SNAKEMAKE) --cores $(N) $(SNAKEFLAGS)

# a handful of jobs in results/smoke/ (< 2 min on 2 cores)
smoke: setup
	$(SNAKEMAKE) --cores $(N) --configfile conf/grid/smoke.yaml $(SNAKEFLAGS)

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
	$(SNAKEMAKE) -n --cores $(N) $(SNAKEFLAGS)

clean-smoke:
	rm -rf results/smoke
