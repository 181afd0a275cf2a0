# Two entry points for a new user: `make study` and `make test`.
# Both create .venv with Python 3.11 when it is missing and install the pinned dependencies.

PYTHON_BOOTSTRAP ?= python3.11
VENV ?= .venv
PYTHON := $(VENV)/bin/python
PARAMS ?= params/study.yaml
STAMP := $(VENV)/.adlib-installed

export HF_HUB_OFFLINE ?= 1
export PYTHONHASHSEED := 0

.PHONY: study test install dry-run sweep bench clean-results

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || $(PYTHON_BOOTSTRAP) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e ".[test]"
	$(PYTHON) -m ipykernel install --prefix $(VENV) --name python3 > /dev/null
	@touch $(STAMP)

install: $(STAMP)

## Run all four notebooks with $(PARAMS); executed copies, figures and CSVs go under runs/, figures/ and results/.
study: $(STAMP)
	$(PYTHON) -m adlib.notebooks --params $(PARAMS)

## Check every job and path of $(PARAMS) without computing.
dry-run: $(STAMP)
	$(PYTHON) -m adlib.notebooks --params $(PARAMS) --dry-run

## Unit tests, then nbval on the committed notebooks.
test: $(STAMP)
	$(PYTHON) -m pytest tests notebooks --nbval --nbval-sanitize-with notebooks/sanitize.cfg -q

## Run the params grid of $(SWEEP) on a local Dask cluster; finished jobs are skipped.
SWEEP ?= params/sweep_elpv_bottle.yaml
sweep: $(STAMP)
	$(PYTHON) -m adlib.sweep $(SWEEP)

## Measure P1-P5 and rewrite BENCHMARKS.md (about 20 minutes on 2 cores).
bench: $(STAMP)
	$(PYTHON) bench/run_benchmarks.py

clean-results:
	rm -rf results runs
