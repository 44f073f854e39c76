#!/usr/bin/env bash
# The GPU check in one command, run from the repo root on a CUDA machine with no network:
#   bash benchmarks/gpu_run.sh        (needs .gpu/ beside it: wheels/ and model/, see below)
#
# .gpu/wheels: cp312 wheels of what server.engine and adapters import beyond torch/transformers/peft
#              (pydantic and its deps, google-re2); installed with --target into /tmp/site.
# .gpu/model:  the default model's config and tokenizer without its weights; a random-weight model of
#              the same architecture is built from it (throughput does not depend on weight values).
# Steps: install, device info, random model, benchmarks/cuda_check.py (PEFT parity on the GPU), the
# suite's CUDA tests (Triton kernels compiled), throughput.py on the 8B-class shape with fresh traffic
# (captured decode, then eager), and on the default model's shape against PEFT and HF. Each step's log and JSON go to $OUT; a
# failed or timed-out step is reported and the next one still runs. Everything stops by $BUDGET_S.
set -u -o pipefail

OUT=${OUT:-/tmp/gpu_out}
BUDGET_S=${BUDGET_S:-480}  # wall-clock seconds for the whole script: 8 minutes
ROUNDS=${ROUNDS:-2}
MODEL_DIR=${MODEL_DIR:-/tmp/loraserve-random-model}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
declare -a RESULTS=()
FAILED=0

# step NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S, time left), logging to $OUT/NAME.log
step() {
    local name=$1 cap=$2 left rc started
    shift 2
    left=$((BUDGET_S - SECONDS))
    if ((left < 10)); then
        RESULTS+=("SKIP $name (budget spent)"); FAILED=1; return 1
    fi
    ((cap > left)) && cap=$left
    echo "=== $name (limit ${cap}s, ${SECONDS}s elapsed)"
    started=$SECONDS
    timeout --kill-after=10 "$cap" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=$?
    if ((rc == 0)); then
        RESULTS+=("OK   $name ($((SECONDS - started))s)")
    else
        ((rc == 124 || rc == 137)) && RESULTS+=("FAIL $name: timed out after ${cap}s") \
                                   || RESULTS+=("FAIL $name: exit $rc ($((SECONDS - started))s)")
        FAILED=1
    fi
    return $rc
}

install_wheels() {
    rm -rf /tmp/site
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl; then
        echo "pip install failed: unpacking the wheels instead"
        mkdir -p /tmp/site && for wheel in .gpu/wheels/*.whl; do python3 -m zipfile -e "$wheel" /tmp/site || return 1; done
    fi
    PYTHONPATH=/tmp/site python3 -c 'import pydantic, pydantic_core, re2; print("pydantic", pydantic.VERSION, re2.__file__)'
}

device_info() {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, transformers, peft; print(torch.__version__, torch.cuda.get_device_name(), "transformers", transformers.__version__, "peft", peft.__version__)'
}

make_random_model() {
    python3 - "$MODEL_DIR" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM

source, target = Path(".gpu/model"), Path(sys.argv[1])
shutil.rmtree(target, ignore_errors=True)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=torch.float32)
model.save_pretrained(target)
for name in ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]:
    if (source / name).exists():
        shutil.copy(source / name, target / name)  # the original config and tokenizer, beside random weights
print(target, sum(p.numel() for p in model.parameters()) / 1e6, "M parameters:", sorted(p.name for p in target.iterdir()))

from transformers import AutoTokenizer
try:  # saved by a newer transformers: fall back to the generic fast tokenizer class if need be
    tokenizer = AutoTokenizer.from_pretrained(target)
except Exception as exc:
    import json
    print(f"AutoTokenizer failed ({exc!r}): retrying with tokenizer_class PreTrainedTokenizerFast")
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(target)
print(type(tokenizer).__name__, len(tokenizer), tokenizer.encode("Hello there"))
EOF
}

export MODEL_DIR
export -f install_wheels device_info make_random_model  # `timeout` runs them in a child bash
step install 90 bash -c install_wheels
export PYTHONPATH=/tmp/site:$PWD
step device_info 60 bash -c device_info
step random_model 150 bash -c make_random_model
CHECK_DIR=.gpu/model
[[ -f $MODEL_DIR/tokenizer_config.json ]] && CHECK_DIR=$MODEL_DIR  # its tokenizer config is the one that loaded
# PEFT parity: gathered (runs, groups, row kernels) and merged logits in fp32 and bf16; engine greedy
# tokens with captured decode in fp32 and bf16, and on the per-sequence torch path.
step cuda_check 150 python3 benchmarks/cuda_check.py --model-dir "$CHECK_DIR" --out "$OUT/cuda_check.json"
# The tests that run on CUDA when it is there: the Triton kernels compiled (not interpreted), the sampler.
# CUDA_TESTS overrides the list (e.g. CUDA_TESTS="tests -k cuda"), word-split into pytest's arguments.
CUDA_TESTS=${CUDA_TESTS:-tests/adapters/test_lora_kernels.py tests/engine/test_row_attention.py tests/engine/test_sampling.py}
# shellcheck disable=SC2086
step pytest_cuda 90 python3 -m pytest -q -p no:cacheprovider $CUDA_TESTS
# The 8B-class shape, bf16, fresh traffic, 64 requests: mixed and base, one stream, peak memory.
step throughput_8b 170 python3 benchmarks/throughput.py --shape llama-8b --model "$CHECK_DIR" --device cuda \
    --skip-references --one-stream --requests 64 --rounds "$ROUNDS" --out "$OUT/throughput_8b.json"
# The same without graphs, to see what capture buys (and a fallback figure if capture fails).
step throughput_8b_eager 100 python3 benchmarks/throughput.py --shape llama-8b --model "$CHECK_DIR" --device cuda \
    --skip-references --enforce-eager --requests 64 --rounds 1 --out "$OUT/throughput_8b_eager.json"
# The default model's architecture against PEFT and HF generate, if time is left.
step throughput_small 120 python3 benchmarks/throughput.py --model "$MODEL_DIR" --device cuda \
    --requests 64 --rounds 2 --out "$OUT/throughput_cuda.json"

echo "=== summary (${SECONDS}s)"
printf '%s\n' "${RESULTS[@]}" | tee "$OUT/summary.txt"
exit $FAILED
