"""Weight-only int8 on a CUDA device: does the kernel run there (or is it refused with the reason),
and is it right? On the GPU machine, from the repo root, with the wheels and the default model's
config and tokenizer in .gpu/ (see gpu_run.sh): `PYTHONPATH=/tmp/site:$PWD python3 benchmarks/int8_cuda_check.py`.

Checks: the startup probe (adapters/backends/cpu.check_int8_kernel, the kernel every device
without a backend of its own runs); the raw kernel against exact products
(relative error: bf16 output rounding), also at inner dimensions the CPU kernel cannot take; a
tiny Llama with a LoRA adapter gathered and merged against fp32 PEFT on the dequantized model (as
tests/adapters/test_quantization.py does on CPU); and the engine generating on a random model of the
default architecture. Writes $OUT/int8_cuda.json.
"""

import copy
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

sys.path[:0] = ["tests", "tests/adapters"]  # support.* and test_quantization
out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
dev = torch.device("cuda")
from adapters import AdapterRegistry, wrap_model  # noqa: E402 - after the sys.path line above
from adapters.backends.cpu import check_int8_kernel, int8_matmul  # noqa: E402
from adapters.kernels import Int8Weight, QuantizationError  # noqa: E402

try:
    check_int8_kernel(dev)
    out["probe"] = "ok"
except QuantizationError as exc:
    out["probe"] = f"refused: {exc}"
raw = {}


def raw_check(shapes):
    for n, k in shapes:
        try:
            w = Int8Weight.quantize(torch.randn(n, k, device=dev) * 0.02)
            x = torch.randn(5, k, device=dev).bfloat16()
            y = int8_matmul(x, w).double()
            ref = x.double() @ w.dequantize(torch.float64).T
            raw[f"{n}x{k}"] = ((y - ref).abs().max() / ref.abs().max()).item()
            torch.cuda.synchronize()
        except Exception as exc:
            raw[f"{n}x{k}"] = f"error: {str(exc)[:200]}"


raw_check([(960, 576), (49152, 576)])
out["raw_rel_err"] = raw
try:
    import peft
    from test_quantization import bf16_linears, dequantized_copy, quantized_names
    from transformers import LlamaConfig, LlamaForCausalLM

    from support.peft import make_peft_adapter

    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).eval()
    path = make_peft_adapter(base, Path(tempfile.mkdtemp()) / "a", r=8, target_modules="all-linear")
    ids = torch.randint(0, 128, (4, 6), device=dev)
    ref = peft.PeftModel.from_pretrained(dequantized_copy(base), str(path)).eval().to(dev)
    with torch.no_grad():
        e = ref(ids).logits
        with bf16_linears(ref, quantized_names(base)):
            r = ref(ids).logits
        lm = wrap_model(copy.deepcopy(base).to(dev), max_rank=16, quantization="int8")
        reg = AdapterRegistry(lm)
        reg.add("a", path)
        s = reg.acquire("a").slot
        with lm.gather(lm.build_batch(torch.full((ids.numel(),), s))):
            g = lm.model(ids).logits
        lm.merge(s)
        m = lm.model(ids).logits
    out["model"] = {
        "bf16_effect": (r - e).abs().max().item(),
        "gather_err": (g - e).abs().max().item(),
        "merged_err": (m - e).abs().max().item(),
        "quantized_layers": sum(layer.quantized is not None for layer in lm.layers.values()),
    }
except Exception as exc:
    out["model"] = "".join(traceback.format_exception_only(exc))[-600:]
try:
    from transformers import AutoTokenizer

    from server.engine.llm_engine import EngineConfig, LLMEngine
    from server.engine.model_loader import BaseModel
    from server.engine.sampling_params import SamplingParams

    tok = AutoTokenizer.from_pretrained(".gpu/model")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.from_pretrained(".gpu/model")).eval().to(dev)
    engine = LLMEngine(
        BaseModel(model, tok, "rand", Path(".gpu/model")), EngineConfig(quantization="int8", kernel_choice="auto")
    )
    c = engine.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    out["engine"] = {
        "tokens": c.token_ids,
        "int8_layers": sum(layer.quantized is not None for layer in engine.lora_model.layers.values()),
    }
except Exception as exc:
    out["engine"] = f"{type(exc).__name__}: {str(exc)[:400]}"
raw_check([(33, 48), (33, 40), (10, 8)])  # inner dims the CPU kernel cannot take; last: may break the context
print(json.dumps(out, indent=1))
Path(os.environ.get("OUT", "/tmp")).joinpath("int8_cuda.json").write_text(json.dumps(out, indent=1))
