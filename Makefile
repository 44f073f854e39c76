# Quick start: `make serve` (set up, start the server on the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test serve bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/install.sh
	test -x $(PY) || python3 -m venv $(VENV)
	PYTHON=$(PY) LORASERVE_DEV=1 scripts/install.sh
	touch $@

test: setup
	$(PY) -m pytest -q

serve: setup
	$(VENV)/bin/loraserve serve

bench: setup
	$(PY) benchmarks/adapter_ops.py
	$(PY) benchmarks/adapter_ops.py --pack-weights
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache
