"""End-to-end throughput with fresh traffic: loraserve against PEFT and HF `generate`.

Four configurations, each run on 64 requests (prompts of 20-300 tokens, outputs of 16-128 tokens
with ignore_eos, 4 adapters of different ranks and targets):
  (a) loraserve, requests spread over the 4 adapters (mixed batches)
  (b) loraserve, the requests on the base model
  (c) PEFT `generate(adapter_names=...)`, mixed adapters, static batches of 16
  (d) HF `generate` on the base, static batches of 16
Static batches run until their longest request is done; only each request's own output length
counts as useful tokens, so (c) and (d) pay for the padding and idle rows a static batch carries.

Fresh traffic: every run of every round draws its own prompts and lengths (seeded by round and
configuration, so a rerun is reproducible but no run replays another's prompts or shapes), and the
only warm-up is a 4-request run on prompts of its own. A cache keyed by shape (cuDNN's plans, a
graph per shape) or by prompt cannot flatter a later round, and the first round is reported beside
the median: a first round far below the median is warm-up the benchmark would otherwise hide.
The four run in turn, round after round, so a slow spell hits one round rather than one
configuration; each ratio is the median of its per-round ratios of tokens/s.

--shape llama-8b builds an 8B-class Llama with random weights in place (hidden 4096, 32 layers,
MLP 14336, 32 heads / 8 KV heads, the default tokenizer's vocabulary: 7.4 B parameters; speed does
not depend on weight values), directly in --dtype on --device; --layers shrinks it for a smoke run.
--one-stream adds one request alone on an adapter (its decode tokens/s, prefill excluded).

Usage: python benchmarks/throughput.py [--requests 64] [--rounds 3] [--out PATH] [--model PATH]
       [--device cuda] [--shape default|llama-8b] [--dtype bfloat16] [--skip-references] [--one-stream]

--model: any local model (an HF directory or a .gguf; with --shape llama-8b, only its tokenizer is
used); the embedded default if not given. --device: where every configuration runs (cpu by
default); on CUDA each timing waits for the device, and the JSON records peak device memory.
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
from safetensors.torch import save_file
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_loader import BaseModel, load_base_model, resolve_model_dir
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


def make_workload(tokenizer, num_requests: int, seed: int) -> list[dict]:
    """Fresh requests: prompts are random draws of the text's tokens, so no two runs share one."""
    rng = random.Random(seed)
    text_ids = tokenizer.encode(TEXT * 4)
    names = list(ADAPTERS)
    return [
        {
            "prompt": rng.choices(text_ids, k=rng.randint(20, 300)),
            "max_tokens": rng.randint(16, 128),
            "adapter": names[i % len(names)],
        }
        for i in range(num_requests)
    ]


def llama_8b(tokenizer, device: torch.device, dtype: torch.dtype, layers: int | None) -> BaseModel:
    """The 8B-class shape with random weights, built in `dtype` on `device` (no fp32 copy)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers or 32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.requires_grad_(False)
    return BaseModel(model, tokenizer, "llama-8b-random", Path("llama-8b-random"))


def make_adapters(model, root: Path) -> dict[str, Path]:
    """The ADAPTERS as PEFT directories with random non-zero A and B, written straight from the
    model's shapes: no copy of the model (PEFT's get_peft_model wraps one, 15 GB at 8B)."""
    generator = torch.Generator().manual_seed(0)
    paths = {}
    for name, (rank, targets) in ADAPTERS.items():
        tensors = {}
        for module_name, module in model.named_modules():
            if module_name.rsplit(".", 1)[-1] in targets:
                out_features, in_features = module.weight.shape
                a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
                b = torch.randn(out_features, rank, generator=generator) / rank**0.5
                prefix = f"base_model.model.{module_name}"
                tensors[f"{prefix}.lora_A.weight"] = a.to(module.weight.dtype)
                tensors[f"{prefix}.lora_B.weight"] = b.to(module.weight.dtype)
        paths[name] = root / name
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type="CAUSAL_LM")
        config.save_pretrained(paths[name])
        save_file(tensors, paths[name] / "adapter_model.safetensors")
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


def one_stream(engine: LLMEngine, tokenizer, seed: int, tokens: int = 128) -> float:
    """Decode tokens/s of one request alone on an adapter (prefill excluded), fresh prompt."""
    (request,) = make_workload(tokenizer, 1, seed)
    finished = []
    engine.request_listeners = [*engine.request_listeners, finished.append]
    try:
        engine.generate([request["prompt"]], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True), ["qv8"])
    finally:
        engine.request_listeners = engine.request_listeners[:-1]
    stats = finished[-1]
    return (tokens - 1) / (stats.e2e_latency - stats.time_to_first_token)


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


def write_result(args, base, device: torch.device, runs: dict[str, list[dict]], streams: list[float], engine) -> dict:
    """Write the JSON for the rounds done so far; returns the median ratios."""
    tps = {name: [r["tokens"] / r["seconds"] for r in done] for name, done in runs.items() if done}
    pairs = {"a/b": ("a_loraserve_mixed", "b_loraserve_base"), "a/c": ("a_loraserve_mixed", "c_peft_mixed_static16")}
    pairs["b/d"] = ("b_loraserve_base", "d_hf_base_static16")
    per_round = {
        name: [x / y for x, y in zip(tps[top], tps[bottom])]
        for name, (top, bottom) in pairs.items()
        if top in tps and bottom in tps
    }
    ratios = {name: statistics.median(values) for name, values in per_round.items()}
    stats = engine.stats()
    graphs = engine.runner.graphs
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu": _cpu_name(),
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
        "model": {
            "name": base.name,
            "shape": args.shape,
            "layers": base.model.config.num_hidden_layers,
            "parameters": sum(p.numel() for p in base.model.parameters()),
            "dtype": str(base.model.dtype),
        },
        "workload": {
            "requests": args.requests,
            "fresh": "each run draws its own prompts and lengths (seed = 1000 x round + configuration)",
            "adapters": {k: {"rank": r, "targets": t} for k, (r, t) in ADAPTERS.items()},
        },
        "rounds": max(len(done) for done in runs.values()),
        "runs": runs,
        "output_tokens_per_s": {
            name: {
                "per_round": values,
                "first_round": values[0],
                "median": statistics.median(values),
                "first_over_median": values[0] / statistics.median(values),
            }
            for name, values in tps.items()
        },
        "ratios_per_round": per_round,
        "ratios": ratios,
        "targets": TARGETS,
        "engine": {
            "steps_by_mode": dict(stats.steps_by_mode),
            "swaps": stats.num_swaps,
            "preemptions": stats.num_preemptions,
            "row_kernels": engine.runner.row_kernels,
            "decode_graphs": None if graphs is None else len(graphs.graphs),
            "memory_plan_bytes": stats.memory_plan,
        },
    }
    if streams:
        result["one_stream_decode_tokens_per_s"] = {"per_round": streams, "median": statistics.median(streams)}
    if device.type == "cuda":
        result["peak_device_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return ratios


def _cpu_name() -> str:
    """lscpu's model name: every figure names its CPU."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--model", default=None, help="a local HF directory or .gguf (default: the embedded model)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]; the references run there too")
    parser.add_argument("--shape", choices=["default", "llama-8b"], default="default")
    parser.add_argument("--layers", type=int, default=None, help="llama-8b with fewer layers (a smoke run)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument("--skip-references", action="store_true", help="no PEFT/HF runs (c, d)")
    parser.add_argument("--one-stream", action="store_true", help="also one request alone per round")
    parser.add_argument("--step-kernels", choices=["auto", "triton", "torch"], default="auto")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None)
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.shape == "llama-8b":
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.model)[0])
        base = llama_8b(tokenizer, device, dtype, args.layers)
    else:
        base = load_base_model(args.model, device=device, dtype=dtype)
    references = not args.skip_references
    # The references need device memory of their own (two copies of the model and their batches).
    utilization = args.gpu_memory_utilization or (0.5 if references else 0.9)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_adapters(base.model, Path(tmp))
        runs = {
            "a_loraserve_mixed": lambda workload: run_loraserve(engine, workload, use_adapters=True),
            "b_loraserve_base": lambda workload: run_loraserve(engine, workload, use_adapters=False),
        }
        if references:
            plain = copy.deepcopy(base.model)
            peft_model = peft.PeftModel.from_pretrained(
                copy.deepcopy(base.model), adapter_dirs["qv8"], adapter_name="qv8"
            )
            for name in list(ADAPTERS)[1:]:
                peft_model.load_adapter(adapter_dirs[name], adapter_name=name)
            runs["c_peft_mixed_static16"] = lambda workload: run_static(peft_model, base.tokenizer, workload, True)
            runs["d_hf_base_static16"] = lambda workload: run_static(plain, base.tokenizer, workload, False)
        # Prefix caching off: fresh prompts would not hit it anyway; benchmarks/prefix_cache.py measures it.
        config = EngineConfig(
            max_num_seqs=64,
            enable_prefix_caching=False,
            step_kernels=args.step_kernels,
            enforce_eager=args.enforce_eager,
            gpu_memory_utilization=utilization,
        )
        engine = LLMEngine(base, config)
        for name, path in adapter_dirs.items():
            engine.registry.add(name, path)
        warmup = make_workload(base.tokenizer, 4, seed=-1)  # prompts of its own: nothing measured repeats them
        for run in runs.values():
            run(warmup)
        done: dict[str, list[dict]] = {name: [] for name in runs}
        streams: list[float] = []
        for round_index in range(args.rounds):
            for config_index, (name, run) in enumerate(runs.items()):
                workload = make_workload(base.tokenizer, args.requests, seed=1000 * round_index + config_index)
                tokens = sum(w["max_tokens"] for w in workload)
                seconds = run(workload)
                done[name].append({"seconds": seconds, "tokens": tokens})
                print(f"round {round_index + 1} {name:24s} {seconds:8.1f} s {tokens / seconds:8.1f} tok/s", flush=True)
            if args.one_stream:
                streams.append(one_stream(engine, base.tokenizer, seed=1000 * round_index + 99))
                print(f"round {round_index + 1} one stream {streams[-1]:8.1f} tok/s", flush=True)
            ratios = write_result(args, base, device, done, streams, engine)  # a cut-short run keeps its rounds
    for name, value in ratios.items():
        print(f"{name}: {value:.2f} (target >= {TARGETS[name]}) {'ok' if value >= TARGETS[name] else 'MISSED'}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
