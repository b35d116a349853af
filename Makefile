# Two entry points for a fresh clone (see README):
#   make demo   set up .venv (idempotent) and run the full pipeline on synthetic data
#   make test   set up .venv (idempotent) and run the test suite
#   make bench  benchmarks; also installs the benchmark-only packages (bench-setup, never needed
#               by demo/test)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cksum requirements.txt | cut -d' ' -f1)
PYTEST_ARGS ?=
DEMO_ARGS ?=
BENCH_REQ   = benchmarks/requirements-bench.txt
BENCH_STAMP = $(VENV)/.bench-installed-$(shell cksum $(BENCH_REQ) | cut -d' ' -f1)

.PHONY: setup demo test bench bench-setup clean-venv

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

bench-setup: $(BENCH_STAMP)

# --no-deps: antspyx declares numpy<2.4 / scipy<1.16; its other needs are pinned in $(BENCH_REQ)
$(BENCH_STAMP): $(BENCH_REQ) $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -r $(BENCH_REQ)
	$(PY) -c "import ants"
	@rm -f $(VENV)/.bench-installed-*
	@touch $@

bench: setup bench-setup
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_identification.py
	$(PY) benchmarks/bench_peer.py --self-check
	$(PY) benchmarks/bench_peer.py

clean-venv:
	rm -rf $(VENV)
