#!/usr/bin/env bash
# Fill .gpu/ on a dev machine (with PyPI), for benchmarks/gpu_run.sh on a GPU machine without network:
#   bash benchmarks/gpu_prepare.sh          then carry .gpu/ with the repo
# .gpu/wheels: what server.engine and adapters import beyond the GPU machine's torch, transformers,
#              peft and triton (pydantic with its dependencies, google-re2), for its Python (cp312).
# .gpu/model:  the default model's config and tokenizer, without weights (gpu_run.sh builds random ones).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-312}
rm -rf .gpu && mkdir -p .gpu/wheels .gpu/model
"$PY" -m pip download -q --only-binary=:all: --python-version "$GPU_PYTHON" --platform manylinux2014_x86_64 \
    --platform manylinux_2_28_x86_64 -d .gpu/wheels \
    pydantic pydantic-settings google-re2 python-dotenv
model_dir=$("$PY" -m server.engine.model_loader)
for name in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
    [[ -f $model_dir/$name ]] && cp "$model_dir/$name" .gpu/model/
done
du -sh .gpu/wheels .gpu/model
