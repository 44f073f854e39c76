#!/usr/bin/env bash
# The GPU check rehearsed on this CPU machine (CI runs it): a fresh venv holding only the GPU image's
# packages that the check needs (CPU torch standing in for CUDA torch, at the dev venv's versions),
# the carried wheels filled by gpu_prepare.sh for this Python and installed as gpu_run.sh installs
# them (--no-index), then `gpu_run.sh --rehearse`: every step, Triton interpreted, tiny shapes. A new
# import the closure cannot see, a wheel that is not carried or a broken step fails here, in CI,
# instead of in a GPU session's few minutes.
#   bash benchmarks/gpu_rehearse.sh        (after `make setup`; OUT=/tmp/gpu_rehearsal by default)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV_PY=${DEV_PY:-.venv/bin/python}
VENV=${REHEARSAL_VENV:-/tmp/loraserve-gpu-rehearsal}
export OUT=${OUT:-/tmp/gpu_rehearsal}
rm -rf "$VENV" "$OUT"
python3 -m venv "$VENV"
mapfile -t image < <("$DEV_PY" benchmarks/gpu_closure.py --image | sed 's/+.*//')  # name==version, no local tag
"$VENV/bin/python" -m pip install -q -c constraints.txt "${image[@]}"
# Their dependencies came too; any that the image does not hold (typer's pydantic, say) goes again.
mapfile -t extra < <("$VENV/bin/python" -I - benchmarks/gpu_image_packages.txt <<'PY'
import re, sys
from importlib.metadata import distributions
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = {norm(l.strip()) for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
print("\n".join(sorted({norm(d.metadata["Name"]) for d in distributions()} - image - {"pip"})))
PY
)
((${#extra[@]})) && "$VENV/bin/python" -m pip uninstall -q -y "${extra[@]}"
PY=$DEV_PY GPU_PYTHON=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")') \
    GPU_DIR=.gpu-rehearsal bash benchmarks/gpu_prepare.sh
PYTHON=$VENV/bin/python GPU_DIR=.gpu-rehearsal SITE=/tmp/loraserve-gpu-rehearsal-site \
    MODEL_DIR=/tmp/loraserve-rehearsal-model bash benchmarks/gpu_run.sh --rehearse
