# Two entry points for a fresh clone (see README):
#   make demo   set up .venv (idempotent) and run the full pipeline on synthetic data
#   make test   set up .venv (idempotent) and run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q --upgrade pip
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	@rm -f $(VENV)/.installed-*
	@touch $@

demo: setup
	$(PY) run_pipeline.py $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

bench: setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_identification.py

clean-venv:
	rm -rf $(VENV)
