#!/usr/bin/env bash
# The GPU check in one command, run from the repo root on a CUDA machine with no network:
#   bash benchmarks/gpu_run.sh             (needs .gpu/ beside it: wheels/ and model/, see below)
#   bash benchmarks/gpu_run.sh --rehearse  (every step on this CPU: Triton's interpreter, tiny shapes;
#                                           benchmarks/gpu_rehearse.sh runs it in CI, in a venv that
#                                           holds only the GPU image's packages and the carried wheels)
#
# .gpu/wheels: wheels of what the check imports beyond the GPU image (gpu_prepare.sh derives them
#              from the import closure); installed with --target into $SITE.
# .gpu/model:  the default model's config and tokenizer without its weights; a random-weight model of
#              the same architecture is built from it (throughput does not depend on weight values).
# Steps, most valuable first, their caps summing to the budget (8 minutes): install, device info,
# random model, benchmarks/cuda_check.py (PEFT parity), throughput.py on the 8B-class shape with fresh
# traffic (captured decode: mixed, base, one stream, peak memory), the suite's CUDA tests (Triton
# kernels compiled), then the 8B shape eager. Each step's log and JSON go to $OUT; a failed or
# timed-out step is reported and the next one still runs. Everything stops by $BUDGET_S.
set -u -o pipefail

REHEARSE=0
PYTHON=${PYTHON:-python3}
GPU_DIR=${GPU_DIR:-.gpu}
SITE=${SITE:-/tmp/site}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # nothing outside the machine can be reached anyway

OUT=${OUT:-/tmp/gpu_out}
BUDGET_S=${BUDGET_S:-480}  # wall-clock seconds for the whole script: 8 minutes
CAP_SCALE=1
# A rehearsal checks that every step passes, not its GPU timing: Triton's interpreter on a shared CPU
# may take several times a GPU step's cap.
[[ ${1:-} == --rehearse ]] && REHEARSE=1 CAP_SCALE=3 BUDGET_S=$((BUDGET_S * 3))
ROUNDS=${ROUNDS:-2}
MODEL_DIR=${MODEL_DIR:-/tmp/loraserve-random-model}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 1
declare -a RESULTS=()
FAILED=0

# step NAME CAP_S CMD...: run CMD with a timeout of min(CAP_S x CAP_SCALE, time left), logging to $OUT/NAME.log
step() {
    local name=$1 cap=$(($2 * CAP_SCALE)) left rc started
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
    rm -rf "$SITE"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$GPU_DIR"/wheels/*.whl; then
        echo "pip install failed: unpacking the wheels instead"
        mkdir -p "$SITE" && for wheel in "$GPU_DIR"/wheels/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$SITE" || return 1; done
    fi
    PYTHONPATH=$SITE "$PYTHON" -c 'import pydantic, re2, llguidance; print("pydantic", pydantic.VERSION, "re2", re2.__file__)'
}

device_info() {
    if ((REHEARSE)); then lscpu | grep -m1 "Model name"; else
        nvidia-smi -L
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    fi
    "$PYTHON" -c 'import torch, transformers, peft; print(torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA", "transformers", transformers.__version__, "peft", peft.__version__)'
}

make_random_model() {
    "$PYTHON" - "$MODEL_DIR" "$GPU_DIR/model" "$REHEARSE" <<'EOF'
import shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig, AutoModelForCausalLM

target, source, rehearse = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
shutil.rmtree(target, ignore_errors=True)
torch.manual_seed(0)
config = AutoConfig.from_pretrained(source)
if rehearse:  # the same architecture, tiny: the interpreter runs every kernel on the CPU
    config.update(dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16))
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.save_pretrained(target)
kept = ["generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
for name in kept if rehearse else ["config.json", *kept]:  # a rehearsal keeps its tiny config
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

export MODEL_DIR PYTHON GPU_DIR SITE REHEARSE
export -f install_wheels device_info make_random_model  # `timeout` runs them in a child bash
# The caps sum to BUDGET_S (480): 40 + 10 + 50 + 120 + 150 + 70 + 40.
step install 40 bash -c install_wheels
export PYTHONPATH=$SITE:$PWD
step device_info 10 bash -c device_info
step random_model 50 bash -c make_random_model
CHECK_DIR=$GPU_DIR/model
[[ -f $MODEL_DIR/tokenizer_config.json ]] && CHECK_DIR=$MODEL_DIR  # its tokenizer config is the one that loaded
if ((REHEARSE)); then  # the CPU stands in: kernels interpreted, the tiny model for the 8B shape
    export TRITON_INTERPRET=1
    DEVICE=cpu SHAPE=() REQUESTS=4
else
    DEVICE=cuda SHAPE=(--shape llama-8b) REQUESTS=64
fi
# PEFT parity: gathered (runs, groups, row kernels) and merged logits in fp32 and bf16; engine greedy
# tokens with captured decode in fp32 and bf16, and on the per-sequence torch path.
step cuda_check 120 "$PYTHON" benchmarks/cuda_check.py --device "$DEVICE" --model-dir "$CHECK_DIR" --out "$OUT/cuda_check.json"
# The 8B-class shape, bf16, fresh traffic, 64 requests: mixed and base, one stream, peak memory.
step throughput_8b 150 "$PYTHON" benchmarks/throughput.py "${SHAPE[@]}" --model "$CHECK_DIR" --device "$DEVICE" \
    --skip-references --one-stream --requests "$REQUESTS" --rounds "$ROUNDS" --out "$OUT/throughput_8b.json"
# The tests that run on CUDA when it is there: the Triton kernels compiled (not interpreted), the sampler.
# CUDA_TESTS overrides the list in benchmarks/gpu_tests.txt (e.g. CUDA_TESTS="tests -k cuda"), word-split.
CUDA_TESTS=${CUDA_TESTS:-$(cat benchmarks/gpu_tests.txt)}
# The default model itself is not carried (too large): the engine tests take its tokenizer from the check's dir.
# shellcheck disable=SC2086
export LORASERVE_TEST_TOKENIZER=$CHECK_DIR
step pytest_cuda 70 "$PYTHON" -m pytest -q -p no:cacheprovider $CUDA_TESTS
# The same shape without graphs, to see what capture buys (and a fallback figure if capture fails).
step throughput_8b_eager 40 "$PYTHON" benchmarks/throughput.py "${SHAPE[@]}" --model "$CHECK_DIR" --device "$DEVICE" \
    --skip-references --enforce-eager --requests "$REQUESTS" --rounds 1 --out "$OUT/throughput_8b_eager.json"

echo "=== summary (${SECONDS}s)"
printf '%s\n' "${RESULTS[@]}" | tee "$OUT/summary.txt"
exit $FAILED
