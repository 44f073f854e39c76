#!/usr/bin/env bash
# Fill .gpu/ on a dev machine (with PyPI), for benchmarks/gpu_run.sh on a GPU machine without network:
#   bash benchmarks/gpu_prepare.sh          then carry .gpu/ with the repo
# .gpu/wheels: what the check imports beyond the GPU image's packages, derived from its import closure
#              (benchmarks/gpu_closure.py), at this venv's versions, for the GPU's Python (cp312) and
#              every manylinux tag its glibc (2.39) accepts.
# .gpu/model:  the default model's config and tokenizer, without weights (gpu_run.sh builds random ones).
#   PY          the dev venv's interpreter (it computes the closure)
#   GPU_PYTHON  the target Python as pip's --python-version takes it (312; the rehearsal passes 311)
#   GPU_DIR     where to write (.gpu; the rehearsal writes .gpu-rehearsal)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
GPU_PYTHON=${GPU_PYTHON:-312}
GPU_DIR=${GPU_DIR:-.gpu}
GLIBC_MINOR=${GLIBC_MINOR:-39}
rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/wheels" "$GPU_DIR/model"
mapfile -t carry < <("$PY" benchmarks/gpu_closure.py)
platforms=(--platform manylinux2014_x86_64 --platform linux_x86_64)
for ((minor = 17; minor <= GLIBC_MINOR; minor++)); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
echo "carrying: ${carry[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$GPU_PYTHON" "${platforms[@]}" \
    -d "$GPU_DIR/wheels" "${carry[@]}"
model_dir=$("$PY" -m server.engine.model_loader)
for name in config.json generation_config.json tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
    [[ -f $model_dir/$name ]] && cp "$model_dir/$name" "$GPU_DIR/model/"
done
du -sh "$GPU_DIR/wheels" "$GPU_DIR/model"
