"""End-to-end throughput on the default model: loraserve against PEFT and HF `generate`.

One process, four configurations over the same 64 requests (prompts of ~20-300 tokens,
outputs of 16-128 tokens with ignore_eos, 4 adapters of different ranks and targets):
  (a) loraserve, requests spread over the 4 adapters (mixed batches)
  (b) loraserve, the same requests on the base model
  (c) PEFT `generate(adapter_names=...)`, mixed adapters, static batches of 16
  (d) HF `generate` on the base, static batches of 16
Static batches run until their longest request is done; only each request's own output length
counts as useful tokens, so (c) and (d) pay for the padding and idle rows a static batch carries.
The four run in turn, round after round (3 by default), so a slow spell on a shared machine hits
one round rather than one configuration; each ratio is the median of its per-round ratios.
Prints output tokens/s and the ratios a/b, a/c, b/d; writes JSON.

Usage: python benchmarks/throughput.py [--requests 64] [--rounds 3] [--out PATH] [--model PATH] [--device cuda]

--model: any local model (an HF directory or a .gguf); the embedded default if not given.
--device: where every configuration runs (cpu by default); on CUDA each timing waits for the device.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import peft
import torch
import transformers
from transformers import GenerationConfig

from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_loader import load_base_model
from server.engine.sampling_params import SamplingParams

ADAPTERS = {  # name -> (rank, targets)
    "qv8": (8, ["q_proj", "v_proj"]),
    "attn16": (16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp8": (8, ["gate_proj", "up_proj", "down_proj"]),
    "all32": (32, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
STATIC_BATCH = 16
TARGETS = {"a/b": 0.85, "a/c": 3.0, "b/d": 1.3}
DEFAULT_OUT = Path(__file__).parent / "results" / "throughput.json"
TEXT = (
    "LoRA adapts a frozen model with a low-rank update, so one server can keep a single base model "
    "resident and serve many small task adapters, mixing their requests in one batch. "
)


def make_workload(tokenizer, num_requests: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    text_ids = tokenizer.encode(TEXT * 40)
    names = list(ADAPTERS)
    return [
        {
            "prompt": text_ids[start : start + rng.randint(20, 300)],
            "max_tokens": rng.randint(16, 128),
            "adapter": names[i % len(names)],
        }
        for i in range(num_requests)
        for start in [rng.randint(0, 200)]
    ]


def make_adapters(model, root: Path) -> dict[str, Path]:
    paths = {}
    for name, (rank, targets) in ADAPTERS.items():
        peft_model = peft.get_peft_model(
            copy.deepcopy(model),
            peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False),
        )
        peft_model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


def clock(device: torch.device) -> float:
    """Seconds now, once the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_loraserve(engine: LLMEngine, workload: list[dict], use_adapters: bool) -> float:
    params = [SamplingParams(max_tokens=w["max_tokens"], temperature=0, ignore_eos=True) for w in workload]
    adapters = [w["adapter"] if use_adapters else None for w in workload]
    device = engine.lora_model.device
    started = clock(device)
    engine.generate([w["prompt"] for w in workload], params, adapters)
    return clock(device) - started


def run_static(model, tokenizer, workload: list[dict], use_adapters: bool) -> float:
    """HF/PEFT generate in static batches of 16, left-padded, each batch to its longest output."""
    device = model.device
    started = clock(device)
    for first in range(0, len(workload), STATIC_BATCH):
        batch = workload[first : first + STATIC_BATCH]
        width = max(len(w["prompt"]) for w in batch)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids = torch.tensor([[pad] * (width - len(w["prompt"])) + w["prompt"] for w in batch], device=device)
        mask = torch.tensor([[0] * (width - len(w["prompt"])) + [1] * len(w["prompt"]) for w in batch], device=device)
        config = GenerationConfig(
            max_new_tokens=max(w["max_tokens"] for w in batch), do_sample=False, eos_token_id=None, pad_token_id=pad
        )
        extra = {"adapter_names": [w["adapter"] for w in batch]} if use_adapters else {}
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **extra)
    return clock(device) - started


def write_result(
    out: Path, base, device: torch.device, workload: list[dict], seconds: dict[str, list[float]], engine: LLMEngine
) -> dict[str, float]:
    """Write the JSON for the rounds done so far; returns the median ratios."""
    useful_tokens = sum(w["max_tokens"] for w in workload)
    a, b, c, d = seconds.values()  # per round; a ratio of throughputs is the inverse ratio of times
    per_round = {
        "a/b": [y / x for x, y in zip(a, b)],
        "a/c": [y / x for x, y in zip(a, c)],
        "b/d": [y / x for x, y in zip(b, d)],
    }
    ratios = {name: statistics.median(values) for name, values in per_round.items()}
    tps = {name: useful_tokens / statistics.median(values) for name, values in seconds.items()}
    stats = engine.stats()
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "load_average_1m": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "model": {"name": base.name, "path": str(base.path), "dtype": str(base.model.dtype)},
        "workload": {
            "requests": len(workload),
            "useful_output_tokens": useful_tokens,
            "prompt_tokens": sum(len(w["prompt"]) for w in workload),
            "adapters": {k: {"rank": r, "targets": t} for k, (r, t) in ADAPTERS.items()},
        },
        "rounds": len(seconds["a_loraserve_mixed"]),
        "seconds": seconds,
        "median_output_tokens_per_s": tps,
        "ratios_per_round": per_round,
        "ratios": ratios,
        "targets": TARGETS,
        "engine": {
            "steps_by_mode": dict(stats.steps_by_mode),
            "swaps": stats.num_swaps,
            "preemptions": stats.num_preemptions,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--model", default=None, help="a local HF directory or .gguf (default: the embedded model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; the references run there too")
    args = parser.parse_args()

    device = torch.device(args.device)
    base = load_base_model(args.model, device=device)
    workload = make_workload(base.tokenizer, args.requests)
    useful_tokens = sum(w["max_tokens"] for w in workload)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_adapters(base.model, Path(tmp))
        plain = copy.deepcopy(base.model)
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base.model), adapter_dirs["qv8"], adapter_name="qv8")
        for name in list(ADAPTERS)[1:]:
            peft_model.load_adapter(adapter_dirs[name], adapter_name=name)
        # Prefix caching off: every round replays the same prompts, so a warm cache would skip their
        # prefill and measure caching (benchmarks/prefix_cache.py does), not batching against PEFT/HF.
        engine = LLMEngine(base, EngineConfig(max_num_seqs=64, enable_prefix_caching=False))
        for name, path in adapter_dirs.items():
            engine.registry.add(name, path)

        warmup = workload[:4]
        run_loraserve(engine, warmup, True), run_static(peft_model, base.tokenizer, warmup, True)
        runs = {
            "a_loraserve_mixed": lambda: run_loraserve(engine, workload, use_adapters=True),
            "b_loraserve_base": lambda: run_loraserve(engine, workload, use_adapters=False),
            "c_peft_mixed_static16": lambda: run_static(peft_model, base.tokenizer, workload, use_adapters=True),
            "d_hf_base_static16": lambda: run_static(plain, base.tokenizer, workload, use_adapters=False),
        }
        seconds = {name: [] for name in runs}
        for round_index in range(args.rounds):
            for name, run in runs.items():
                seconds[name].append(run())
                print(
                    f"round {round_index + 1} {name:24s} {seconds[name][-1]:8.1f} s "
                    f"{useful_tokens / seconds[name][-1]:8.1f} tok/s",
                    flush=True,
                )
            if round_index + 1 < args.rounds:  # a run cut short still leaves the rounds it finished
                write_result(args.out, base, device, workload, seconds, engine)
    ratios = write_result(args.out, base, device, workload, seconds, engine)
    for name, value in ratios.items():
        print(f"{name}: {value:.2f} (target >= {TARGETS[name]}) {'ok' if value >= TARGETS[name] else 'MISSED'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
