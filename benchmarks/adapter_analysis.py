"""Benchmark adapter analysis and rank compression on the default model (SmolLM2-135M-Instruct, fp32, CPU).

1. analysis: what GET /v1/adapters/{name}/analysis computes (read the files, QR + r×r SVD per layer,
   in float64) for an r=64 adapter on every linear layer (210 layers), against the textbook route of
   forming each d×k ΔW and taking its SVD.
2. compression: 4 adapters trained at r=32 whose updates have rank 4 (q, k, v, o), compressed at
   energy 0.9999. Memory: the adapters' host bytes and one device slot's buffers at max_lora_rank 32
   against 4. Gather time: one decode step of the mixed batch of benchmarks/adapter_ops.py (16 rows,
   4 adapters, 128 cached tokens), rows interleaved and packed by adapter, originals against the
   compressed copies, timed in alternation (ABBA) on two wrapped copies of the base.
3. a figure and a table of one synthetic adapter (r=16 on q/v, spectrum decaying by 0.7 per index),
   for docs/adapter-analysis.md.

Usage: python benchmarks/adapter_analysis.py [--repeats N] [--out PATH]
One torch thread, as benchmarks/adapter_ops.py explains. Results name the CPU (lscpu's model name).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from adapter_ops import (  # noqa: E402
    NUM_ADAPTERS,
    compare,
    gather_step,
    machine_info,
    packed_by_adapter,
    prepare_decode,
    sample_pairs,
    summarize,
)

from adapters import AdapterRegistry, wrap_model  # noqa: E402
from adapters.analysis import analyze, base_weights  # noqa: E402
from adapters.backends.cpu import cpu_model_name  # noqa: E402
from adapters.compress import compress_dir  # noqa: E402
from adapters.peft_format import read_factors  # noqa: E402
from client.plots import plot_analysis  # noqa: E402
from client.types import AdapterAnalysis  # noqa: E402
from server.engine.model_loader import load_base_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_adapter(base, path: Path, seed: int, **lora) -> Path:
    torch.manual_seed(seed)
    config = peft.LoraConfig(init_lora_weights=False, **lora)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(path)
    return path


def reshape_b(path: Path, fn) -> None:
    """Rewrite every lora_B ([out, r]) of the adapter at `path` through `fn`."""
    tensors = load_file(path / "adapter_model.safetensors")
    tensors = {k: fn(t).contiguous() if ".lora_B." in k else t for k, t in tensors.items()}
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_analysis(base, root: Path, repeats: int) -> dict:
    path = save_adapter(base, root / "r64", 0, r=64, lora_alpha=128, target_modules=ALL_LINEAR)
    weight = base_weights(wrap_model(copy.deepcopy(base)).layers)

    def ours():
        _, config, factors = read_factors(path)
        return analyze("r64", config, factors, weight)

    def dense():  # the d×k route, for contrast: ΔW formed, then a thin SVD of it
        for w in read_factors(path)[2].values():
            torch.linalg.svd(w.b.T @ w.a, full_matrices=False)

    seconds = [timed(ours) for _ in range(repeats)]
    return {
        "rank": 64,
        "targets": ALL_LINEAR,
        "num_layers": len(ours()["layers"]),
        "seconds": seconds,
        "median_s": statistics.median(seconds),
        "dense_svd_s": timed(dense),
    }


def low_rank_adapters(base, root: Path) -> list[Path]:
    paths = []
    for i in range(NUM_ADAPTERS):
        path = save_adapter(base, root / f"low{i}", i, r=32, lora_alpha=64, target_modules=ALL_LINEAR[:4])
        mix = torch.randn(4, 32, generator=torch.Generator().manual_seed(100 + i))
        reshape_b(path, lambda b: b[:, :4] @ mix)  # rank-4 updates in r=32 factors
        paths.append(path)
    return paths


def wrapped(base, paths: list[Path], max_rank: int):
    lm = wrap_model(copy.deepcopy(base), max_loras=NUM_ADAPTERS, max_rank=max_rank)
    registry = AdapterRegistry(lm)
    for path in paths:
        registry.add(path.name, path)
    slots = [registry.acquire(path.name).slot for path in paths]
    host = sum(registry.info(path.name).num_bytes for path in paths)
    slot_bytes = sum(
        (layer.lora_a[0].numel() + layer.lora_b[0].numel()) * layer.lora_a.element_size()
        for layer in lm.layers.values()
        if layer.lora_a is not None
    )
    return lm, slots, {"host_bytes": host, "slot_bytes_per_adapter": slot_bytes}


def bench_compression(base, root: Path, repeats: int) -> dict:
    originals = low_rank_adapters(base, root)
    reports = [compress_dir(p, root / f"{p.name}-c", energy=0.9999) for p in originals]
    compressed = [root / f"{p.name}-c" for p in originals]
    lm_full, slots_full, memory_full = wrapped(base, originals, max_rank=32)
    lm_small, slots_small, memory_small = wrapped(base, compressed, max_rank=max(r.rank for r in reports))
    result = {
        "ranks_after": sorted({r.rank for r in reports}),
        "energy_kept": min(r.energy_kept for r in reports),
        "params_before": sum(r.params_before for r in reports),
        "params_after": sum(r.params_after for r in reports),
        "memory_r32": memory_full,
        "memory_compressed": memory_small,
    }
    for layout in ("interleaved", "packed"):
        steps = []
        for lm, slots in ((lm_full, slots_full), (lm_small, slots_small)):
            cache, ids, token_slots = prepare_decode(lm, slots)
            token_slots = packed_by_adapter(token_slots) if layout == "packed" else token_slots
            steps.append((lm, lm.build_batch(token_slots), cache, ids))
        full, small = sample_pairs(lambda: gather_step(*steps[0]), lambda: gather_step(*steps[1]), repeats)
        # the LoRA share of each step: the same step with no batch (base only), in alternation
        lora = {}
        for label, (lm, batch, cache, ids) in zip(("r32", "compressed"), steps):
            with_lora, base_only = sample_pairs(
                lambda: gather_step(lm, batch, cache, ids), lambda: gather_step(lm, None, cache, ids), repeats
            )
            lora[label] = compare(with_lora, base_only)
        result[f"gather_{layout}"] = {
            "r32": summarize(full),
            "compressed": summarize(small),
            "compressed_vs_r32": compare(small, full),
            "lora_overhead": lora,
        }
    return result


def figure(base, root: Path) -> dict:
    """A synthetic adapter with a decaying spectrum (no trained adapter ships with the repo)."""
    path = save_adapter(base, root / "decay", 5, r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
    decay = 0.7 ** torch.arange(16.0)
    reshape_b(path, lambda b: torch.linalg.qr(b).Q * decay * 4)  # σ_i ∝ 0.7^i (A random: roughly)
    _, config, factors = read_factors(path)
    result = analyze("decay", config, factors, base_weights(wrap_model(copy.deepcopy(base)).layers))
    plot_analysis(AdapterAnalysis(**result), RESULTS / "adapter_analysis.png")
    return {
        "summary": result["summary"],
        "layers": [
            {k: v for k, v in layer.items() if k != "singular_values"}
            | {"top_singular_values": layer["singular_values"][:4]}
            for layer in result["layers"][:4]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS / "adapter_analysis.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_base_model().model
    machine = machine_info() | {"cpu": cpu_model_name()}
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        root = Path(tmp)
        result = {
            "machine": machine,
            "analysis": bench_analysis(base, root, max(3, args.repeats // 5)),
            "compression": bench_compression(base, root, args.repeats),
            "example": figure(base, root),
        }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "example"}, indent=2))


if __name__ == "__main__":
    main()
