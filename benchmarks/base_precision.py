"""Fidelity and speed of lower-precision bases (bf16, weight-only int8, q4_1) on the default model.

Reference: fp32 HF/PEFT (stock kernels), with the adapter or without. For each precision, the
engine (kernel_choice=auto, as the server runs) on base rows, gathered adapter rows and merged:
  - greedy agreement: 16 chat prompts x 64 tokens; tokens until the first divergence from the
    reference's greedy tokens, and the fraction of sequences identical throughout;
  - logprob error: the reference's greedy tokens scored teacher-forced (one prefill of prompt +
    those tokens, prompt_logprobs) against the reference's own logprobs: mean and max |diff|;
  - single-stream decode tokens/s (one request, 128 tokens, ignore_eos, greedy, base rows), and a
    batch of 16 such requests (32 tokens each), as ratios to fp32 in the same run, variants
    interleaved round by round, medians;
  - each kernel's median time per call for the default model's weight shapes at 1, 16 and 64 rows
    (adapters/kernel_plan.measure), in fp32 and bf16: what the engine's kernel choice sees;
  - resident base-weight bytes (parameters, int8 values and scales, packed copies).
"int8" runs fp32 activations (cast to bf16 for the int8 kernel), "int8-bf16" a bf16 model; the
"+head" variants also give the tied head an int8 copy (kernel_plan.QUANTIZE_HEAD). "q4_1": Q4_1
linears and a Q8_0 head (adapters/blocks.py) on fp32 activations, "q4_1-bf16" on bf16 ones.
`--variants` runs some of them (fp32 always: the speed reference).

Usage: python benchmarks/base_precision.py [--threads 1] [--rounds 3] [--variants NAME ...] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch

sys.path.insert(0, str(Path(__file__).parent))
from adapter_ops import machine_info  # noqa: E402
from throughput import make_adapters  # noqa: E402

import adapters.kernel_plan as kernel_plan  # noqa: E402
from adapters import LoraLinear  # noqa: E402
from adapters.backends.cpu import can_pack  # noqa: E402
from adapters.kernel_plan import AUTO, choose_kernels, measure, weight_keys  # noqa: E402
from adapters.kernels import PACKED  # noqa: E402
from server.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from server.engine.model_loader import default_cache_dir, load_base_model  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402

VARIANTS = {  # name -> (dtype, quantization, int8 head)
    "fp32": (torch.float32, "none", False),
    "bf16": (torch.bfloat16, "none", False),
    "int8": (torch.float32, "int8", False),
    "int8+head": (torch.float32, "int8", True),
    "int8-bf16": (torch.bfloat16, "int8", False),
    "int8-bf16+head": (torch.bfloat16, "int8", True),
    "q4_1": (torch.float32, "q4_1", False),
    "q4_1-bf16": (torch.bfloat16, "q4_1", False),
}
ADAPTER = "all32"  # rank 32 on every linear: merged mode merges every int8 layer
MODES = {"base": (None, 10**9), "gather": (ADAPTER, 10**9), "merged": (ADAPTER, 1)}  # adapter, merge_after_steps
NUM_TOKENS, SPEED_TOKENS, BATCH, BATCH_TOKENS = 64, 128, 16, 32
QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "How do I reverse a list in Python?",
    "What causes the seasons on Earth?",
    "Give three tips for better sleep.",
    "Summarize the plot of Romeo and Juliet.",
    "What is a prime number?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Describe a cat to someone who has never seen one.",
    "What is 17 times 23?",
    "List the planets of the solar system.",
    "What does a compiler do?",
    "Write a limerick about a programmer.",
    "How does a bicycle stay upright?",
]
DEFAULT_OUT = Path(__file__).parent / "results" / "base_precision.json"


def make_engine(variant: str, adapter_path: Path) -> tuple[LLMEngine, str]:
    """The engine, and its kernel rules (the cached plan it was built with)."""
    dtype, quantization, head = VARIANTS[variant]
    kernel_plan.QUANTIZE_HEAD = head  # read while planning and wrapping only
    try:
        base = load_base_model(dtype=dtype)
        rules = str(choose_kernels(base.model, AUTO, quantization, default_cache_dir()))
        engine = LLMEngine(base, EngineConfig(quantization=quantization, kernel_choice="auto"))
    finally:
        kernel_plan.QUANTIZE_HEAD = False
    engine.registry.add(ADAPTER, adapter_path)
    return engine, rules


@torch.inference_mode()
def reference(adapter_path: Path, prompts: list[list[int]]) -> dict[str, dict]:
    """mode -> greedy tokens and their teacher-forced logprobs, from fp32 PEFT on stock kernels."""
    model = peft.PeftModel.from_pretrained(load_base_model().model, str(adapter_path), adapter_name=ADAPTER).eval()
    model.get_base_model().generation_config.eos_token_id = None
    out = {}
    for adapter in (None, ADAPTER):
        tokens, logprobs = [], []
        for prompt in prompts:
            ids = torch.tensor([prompt])
            kwargs = {"adapter_names": [adapter or "__base__"]}
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=NUM_TOKENS,
                eos_token_id=None,
                pad_token_id=0,
                **kwargs,
            )
            new = generated[0, len(prompt) :].tolist()
            scores = torch.log_softmax(model(generated[:, :-1], **kwargs).logits[0, -NUM_TOKENS:].float(), -1)
            tokens.append(new)
            logprobs.append(scores.gather(1, torch.tensor(new)[:, None])[:, 0])
        out[adapter or "base"] = {"tokens": tokens, "logprobs": logprobs}
    return out


def fidelity(engine: LLMEngine, mode: str, prompts: list[list[int]], ref: dict) -> dict:
    adapter, merge_after_steps = MODES[mode]
    engine.policy.merge_after_steps = engine.policy.merge_min_steps_left = merge_after_steps
    steps_before = engine.stats().steps_by_mode
    greedy = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, ignore_eos=True)
    completions = engine.generate(prompts, greedy, [adapter] * len(prompts))
    agree = [_common_prefix(c.token_ids, r) for c, r in zip(completions, ref["tokens"])]
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=0)
    scored = engine.generate([p + r for p, r in zip(prompts, ref["tokens"])], scoring, [adapter] * len(prompts))
    errors = torch.cat(
        [
            (torch.tensor([lp.logprob for lp in c.prompt_logprobs[-NUM_TOKENS:]]) - r).abs()
            for c, r in zip(scored, ref["logprobs"])
        ]
    )
    return {
        "tokens_until_divergence_mean": statistics.mean(agree),
        "tokens_until_divergence_min": min(agree),
        "identical_sequences": sum(a == NUM_TOKENS for a in agree) / len(agree),
        "logprob_abs_error_mean": errors.mean().item(),
        "logprob_abs_error_max": errors.max().item(),
        "steps_by_mode": dict(engine.stats().steps_by_mode - steps_before),
    }


def decode_seconds(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> float:
    engine.policy.merge_after_steps = 10**9
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    started = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - started


def kernel_timings(model) -> dict[str, dict]:
    """dtype -> weight -> kernel -> rows -> median µs per call."""
    return {
        str(dtype).removeprefix("torch."): {
            f"{kind} [{out}x{inp}]": {
                kernel: {rows: round(seconds * 1e6, 1) for rows, seconds in by_rows.items()}
                for kernel, by_rows in measure((kind, out, inp), dtype).items()
            }
            for kind, out, inp in sorted({*weight_keys(model, "int8"), *weight_keys(model, "q4_1")})
        }
        for dtype in (torch.float32, torch.bfloat16)
    }


def weight_bytes(engine: LLMEngine) -> dict[str, int]:
    """Resident base weights: parameters (quantized layers have none left), quantized values and scales, and
    the packed copy of each full-precision linear whose rule packs at some row count (wherever that
    copy lives: its layer, or a fused group of siblings)."""
    storages = {p.untyped_storage().data_ptr(): p.nbytes for p in engine.lora_model.model.parameters()}
    linears = [layer for layer in engine.lora_model.layers.values() if isinstance(layer, LoraLinear)]
    quantized = sum(layer.quantized.nbytes for layer in linears if layer.quantized is not None)
    packed = sum(
        layer.weight.nbytes
        for layer in linears
        if layer.quantized is None
        and not layer.is_conv1d
        and PACKED in layer.dense_rule.kernels
        and can_pack(layer.weight)
    )
    return {
        "parameters": sum(storages.values()),
        "quantized": quantized,
        "packed_copies": packed,
        "total": sum(storages.values()) + quantized + packed,
    }


def run(rounds: int, variants: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_base_model().tokenizer
        adapter_path = make_adapters(load_base_model().model, Path(tmp))[ADAPTER]
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in QUESTIONS
        ]
        prompts = [p if isinstance(p, list) else p["input_ids"] for p in prompts]
        ref = reference(adapter_path, prompts)
        engines, rules = {}, {}
        for variant in variants:
            engines[variant], rules[variant] = make_engine(variant, adapter_path)
        references = {mode: ref["base" if mode == "base" else ADAPTER] for mode in MODES}
        results = {
            variant: {
                "kernels": rules[variant],
                "fidelity": {mode: fidelity(engine, mode, prompts, references[mode]) for mode in MODES},
                "weight_bytes": weight_bytes(engine),
            }
            for variant, engine in engines.items()
        }
        speeds = {"single": ([prompts[0]], SPEED_TOKENS), "batch16": (prompts[:BATCH], BATCH_TOKENS)}
        seconds = {(variant, speed): [] for variant in variants for speed in speeds}
        for _ in range(rounds):  # interleaved: a slow spell on a shared machine hits every variant alike
            for variant, engine in engines.items():
                for speed, (batch, max_tokens) in speeds.items():
                    seconds[variant, speed].append(decode_seconds(engine, batch, max_tokens))
    for (variant, speed), values in seconds.items():
        batch, max_tokens = speeds[speed]
        results[variant][f"{speed}_decode_tokens_per_s"] = len(batch) * max_tokens / statistics.median(values)
        results[variant][f"{speed}_decode_speed_vs_fp32"] = statistics.median(
            fp32 / own for fp32, own in zip(seconds["fp32", speed], values)
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    info = machine_info()
    kernel_plan.load_native_kernels(torch.device("cpu"), "q4_1", default_cache_dir())  # our kernels, timed too
    timings = kernel_timings(load_base_model().model)
    results = run(args.rounds, ["fp32", *(v for v in VARIANTS if v in args.variants and v != "fp32")])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "machine": info,
                "prompts": len(QUESTIONS),
                "tokens": NUM_TOKENS,
                "adapter": ADAPTER,
                "results": results,
                "kernel_median_us": timings,
            },
            indent=2,
        )
        + "\n"
    )
    for variant, r in results.items():
        f = r["fidelity"]
        print(
            f"{variant:15s} speed x{r['single_decode_speed_vs_fp32']:.2f} "
            f"({r['single_decode_tokens_per_s']:.1f} tok/s)"
            f" batch16 x{r['batch16_decode_speed_vs_fp32']:.2f}  "
            f"weights {r['weight_bytes']['total'] / 2**20:.0f} MiB  "
            + "  ".join(
                f"{mode}: agree {m['tokens_until_divergence_mean']:.1f} ident {m['identical_sequences']:.2f} "
                f"lp {m['logprob_abs_error_mean']:.4f}/{m['logprob_abs_error_max']:.3f}"
                for mode, m in f.items()
            )
        )


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


if __name__ == "__main__":
    main()
