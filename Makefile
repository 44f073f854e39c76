# Quick start: `make serve` (set up, start the server on the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup lint test soak serve bench gpu-rehearsal clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	PYTHON=$(PY) LORASERVE_DEV=1 scripts/install.sh
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(PY) -m pytest -q

# Ten minutes of mixed traffic on two replicas sharing a store; figures in benchmarks/results/soak.json.
soak: setup
	LORASERVE_SOAK_SECONDS=600 LORASERVE_SOAK_REPORT=benchmarks/results/soak.json $(PY) -m pytest -q -s tests/integration/test_soak.py

# The GPU check's every step on this CPU, in a venv of only the GPU image's packages and the carried wheels.
gpu-rehearsal: setup
	DEV_PY=$(PY) bash benchmarks/gpu_rehearse.sh

serve: setup
	$(VENV)/bin/loraserve serve

bench: setup
	$(PY) benchmarks/adapter_ops.py
	$(PY) benchmarks/adapter_ops.py --kernel-choice packed
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
