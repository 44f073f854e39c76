"""Benchmark loraserve's adapter ops on the default model (SmolLM2-135M-Instruct, fp32, CPU).

Every number is taken against a reference timed in the same run, in alternation (ABBA) and as
medians after a warm-up, because the machine is shared and noisy: the ratios are the result,
the milliseconds are context.

1. swap: `lm.merge(slot)` while another adapter is merged, against a PEFT swap on its own copy of
   the base (`unmerge_adapter()`, `set_adapter(next)`, `merge_adapter()`); merge + unmerge against
   PEFT's `merge_adapter()` + `unmerge_adapter()`; and `lm.unmerge()` alone.
2. gather: one decode step of 16 rows (4 adapters x 4 rows, 128 cached tokens) inside
   `lm.gather(batch)` against the same step with no batch, twice: rows interleaving adapters
   (16 one-row runs: the grouped bmm) and rows packed by adapter as the engine packs them (4 runs:
   direct matmuls); and the wrapped model with no batch against an unwrapped copy of the base
   (base-only batches should cost nothing extra).
3. memory: the slot buffers, and the merge buffers a merge fills (one copy of each targeted weight).

Usage: python benchmarks/adapter_ops.py [--repeats N] [--out PATH] [--threads N] [--profile] [--kernel-choice K]

--kernel-choice packed measures the engine's CPU default: the base weights (and merged weights)
packed for oneDNN (adapters/backends/cpu.py); results go to adapter_ops_packed.json unless --out
says otherwise. plain (the default here) runs F.linear.

One torch thread by default: on a shared 2-core machine, two intra-op threads stall on each other
at every op whenever another process runs (steps 5-20x slower, ratios skewed, runs past 10 min).
`--threads 0` keeps torch's default for a quiet machine.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import peft
import torch
import transformers

from adapters import AdapterRegistry, wrap_model
from adapters.backends.cpu import cpu_model_name
from adapters.kernels import PACKED, PLAIN, KernelPlan
from server.engine.model_loader import load_base_model

NUM_ADAPTERS, RANK, TARGETS = 4, 16, ["q_proj", "k_proj", "v_proj", "o_proj"]
NUM_ROWS, CONTEXT_LEN = 16, 128  # decode step: 16 rows, each with a 128-token KV cache
NUM_SWAP_ADAPTERS = 3  # swaps cycle through this many adapters
WARMUP = 5
SWAP_TARGET_MS, GATHER_TARGET_PCT = 20.0, 15.0
DEFAULT_OUT = Path(__file__).parent / "results" / "adapter_ops.json"


# Timing
def time_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def sample(fn, repeats: int) -> list[float]:
    for _ in range(WARMUP):
        fn()
    return [time_ms(fn) for _ in range(repeats)]


def sample_pairs(fn_a, fn_b, repeats: int) -> tuple[list[float], list[float]]:
    """Time a and b in alternation (ABBA...), so drift and other processes' bursts hit both alike."""
    for _ in range(WARMUP):
        fn_a(), fn_b()
    a, b = [], []
    for i in range(repeats):
        if i % 2 == 0:
            a.append(time_ms(fn_a)), b.append(time_ms(fn_b))
        else:
            b.append(time_ms(fn_b)), a.append(time_ms(fn_a))
    return a, b


def summarize(samples: list[float]) -> dict:
    q1, _, q3 = statistics.quantiles(samples, n=4)
    return {
        "median_ms": statistics.median(samples),
        "p25_ms": q1,
        "p75_ms": q3,
        "min_ms": min(samples),
        "n": len(samples),
    }


def compare(samples: list[float], reference: list[float]) -> dict:
    """Ratio of medians, and the median of per-pair ratios (the sturdier one under bursty load)."""
    ratio = statistics.median(samples) / statistics.median(reference)
    paired = statistics.median(s / r for s, r in zip(samples, reference))
    return {
        "ratio": ratio,
        "paired_ratio": paired,
        "overhead_pct": (ratio - 1) * 100,
        "paired_overhead_pct": (paired - 1) * 100,
    }


# Setup
def make_peft_adapters(base: torch.nn.Module, root: Path) -> list[Path]:
    """Save NUM_ADAPTERS PEFT adapters with random, non-zero B (a zero B would make merges no-ops)."""
    dirs = []
    for i in range(NUM_ADAPTERS):
        torch.manual_seed(i)
        config = peft.LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=TARGETS, init_lora_weights=False)
        directory = root / f"adapter{i}"
        peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(directory)
        dirs.append(directory)
    return dirs


def load_peft_model(base: torch.nn.Module, dirs: list[Path]) -> peft.PeftModel:
    model = peft.PeftModel.from_pretrained(copy.deepcopy(base), dirs[0], adapter_name=dirs[0].name)
    for directory in dirs[1:]:
        model.load_adapter(directory, adapter_name=directory.name)
    return model.eval()


def load_slots(base: torch.nn.Module, dirs: list[Path], kernel_choice: str):
    """Wrap `base` in place and put every adapter in a device slot; returns (lm, slots)."""
    lm = wrap_model(base, max_loras=NUM_ADAPTERS, max_rank=RANK, kernels=KernelPlan(kernel_choice))
    registry = AdapterRegistry(lm)
    for directory in dirs:
        registry.add(directory.name, directory)
    return lm, [registry.acquire(directory.name).slot for directory in dirs]


# 1. Swap
def bench_swap(lm, slots: list[int], peft_model: peft.PeftModel, repeats: int) -> dict:
    slots, names = slots[:NUM_SWAP_ADAPTERS], list(peft_model.peft_config)[:NUM_SWAP_ADAPTERS]
    lm.merge(slots[0])
    peft_model.set_adapter(names[0])
    peft_model.merge_adapter()
    swaps, peft_swaps = sample_pairs(partial(_swap, lm, slots), partial(_peft_swap, peft_model, names), repeats)
    lm.unmerge()
    peft_model.unmerge_adapter()
    merge_unmerge, peft_merge_unmerge = sample_pairs(
        partial(_merge_unmerge, lm, slots[0]), partial(_peft_merge_unmerge, peft_model), repeats
    )
    unmerges = [_time_unmerge(lm, slots[i % len(slots)]) for i in range(repeats)]
    return {
        "swap": summarize(swaps),
        "peft_swap": summarize(peft_swaps),
        "swap_vs_peft": compare(swaps, peft_swaps),
        "merge_unmerge": summarize(merge_unmerge),
        "peft_merge_unmerge": summarize(peft_merge_unmerge),
        "merge_unmerge_vs_peft": compare(merge_unmerge, peft_merge_unmerge),
        "unmerge": summarize(unmerges),
    }


def _swap(lm, slots: list[int]) -> None:
    lm.merge(slots[(slots.index(lm.merged[0][0]) + 1) % len(slots)])


def _merge_unmerge(lm, slot: int) -> None:
    lm.merge(slot)
    lm.unmerge()


def _time_unmerge(lm, slot: int) -> float:
    lm.merge(slot)
    return time_ms(lm.unmerge)


def _peft_swap(model: peft.PeftModel, names: list[str]) -> None:
    following = names[(names.index(model.active_adapter) + 1) % len(names)]
    model.unmerge_adapter()
    model.set_adapter(following)
    model.merge_adapter()


def _peft_merge_unmerge(model: peft.PeftModel) -> None:
    model.merge_adapter()
    model.unmerge_adapter()


# 2. Gather
def prepare_decode(lm, slots: list[int]):
    """A 128-token KV cache for 16 rows, the next token ids [16, 1], and a 4-adapter batch."""
    lm.unmerge()
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, lm.model.config.vocab_size, (NUM_ROWS, CONTEXT_LEN), generator=generator)
    cache = lm.model(prompt, use_cache=True, logits_to_keep=1).cache
    ids = torch.randint(0, lm.model.config.vocab_size, (NUM_ROWS, 1), generator=generator)
    token_slots = torch.tensor(slots)[torch.arange(NUM_ROWS) % NUM_ADAPTERS]  # [16]: rows interleave adapters
    return cache, ids, token_slots


def packed_by_adapter(token_slots: torch.Tensor) -> torch.Tensor:
    """The same rows' adapters side by side, as the engine's runner packs a step."""
    return token_slots.sort(stable=True).values


def decode_step(model: torch.nn.Module, cache, ids: torch.Tensor) -> None:
    """One decode step at CONTEXT_LEN; the token it appends is cropped off again, untimed by callers."""
    model(ids, cache=cache, use_cache=True)
    cache.crop(CONTEXT_LEN - cache.get_seq_length())  # a negative count: tokens to drop


def gather_step(lm, batch, cache, ids: torch.Tensor) -> None:
    with lm.gather(batch):
        decode_step(lm.model, cache, ids)


def bench_gather(lm, unwrapped: torch.nn.Module, slots: list[int], repeats: int) -> dict:
    cache, ids, token_slots = prepare_decode(lm, slots)  # one cache for all: the same context everywhere
    batch = lm.build_batch(token_slots)
    no_batch = partial(decode_step, lm.model, cache, ids)
    gathered, base = sample_pairs(partial(gather_step, lm, batch, cache, ids), no_batch, repeats)
    packed_batch = lm.build_batch(packed_by_adapter(token_slots))
    packed, packed_base = sample_pairs(partial(gather_step, lm, packed_batch, cache, ids), no_batch, repeats)
    wrapped, original = sample_pairs(no_batch, partial(decode_step, unwrapped, cache, ids), repeats)
    build = sample(partial(lm.build_batch, token_slots), repeats)
    return {
        "gather": summarize(gathered),
        "no_batch": summarize(base),
        "gather_vs_no_batch": compare(gathered, base),
        "gather_packed": summarize(packed),
        "packed_no_batch": summarize(packed_base),
        "gather_packed_vs_no_batch": compare(packed, packed_base),
        "wrapped_no_batch": summarize(wrapped),
        "unwrapped": summarize(original),
        "wrapped_vs_unwrapped": compare(wrapped, original),
        "build_batch": summarize(build),
    }


# 3. Memory
def bench_memory(lm, slot: int) -> dict:
    layers = lm.layers.values()
    slot_bytes = sum(layer.lora_a.nbytes + layer.lora_b.nbytes for layer in layers if layer.lora_a is not None)
    lm.merge(slot)
    merge_bytes = sum(layer.merged_weight.nbytes for layer in layers if layer.merged_weight is not None)
    lm.unmerge()
    model_bytes = sum(p.nbytes for p in lm.model.parameters())
    return {
        "slot_buffers_mb": slot_bytes / 2**20,
        "merge_buffers_mb": merge_bytes / 2**20,
        "base_model_mb": model_bytes / 2**20,
        "max_loras": lm.max_loras,
        "max_rank": lm.max_rank,
    }


# Profile (--profile): where a swap and a gathered decode step spend their time
def profile_ops(lm, slots: list[int]) -> None:
    cache, ids, token_slots = prepare_decode(lm, slots)
    _profile("gather decode step", partial(gather_step, lm, lm.build_batch(token_slots), cache, ids))
    lm.merge(slots[0])
    _profile("merged swap", partial(_swap, lm, slots[:NUM_SWAP_ADAPTERS]))
    lm.unmerge()


def _profile(title: str, job, num_calls: int = 10) -> None:
    for _ in range(WARMUP):
        job()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(num_calls):
            job()
    print(f"\n== {title} ({num_calls} calls) ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


# Report
def machine_info() -> dict:
    return {
        "cpu": cpu_model_name(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_before": os.getloadavg()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def table_rows(r: dict) -> list[tuple[str, ...]]:
    swap, gather, memory = r["swap"], r["gather"], r["memory"]
    swap_ms = swap["swap"]["median_ms"]
    overhead = gather["gather_vs_no_batch"]["paired_overhead_pct"]
    model_mb = memory["base_model_mb"]
    return [
        (
            "merged swap (merge while merged)",
            _ms(swap["swap"]),
            "PEFT swap " + _ms(swap["peft_swap"]),
            _ratio(swap["swap_vs_peft"]),
            f"<= {SWAP_TARGET_MS:.0f} ms: {_verdict(swap_ms <= SWAP_TARGET_MS)}",
        ),
        (
            "merge + unmerge",
            _ms(swap["merge_unmerge"]),
            "PEFT merge+unmerge " + _ms(swap["peft_merge_unmerge"]),
            _ratio(swap["merge_unmerge_vs_peft"]),
            "",
        ),
        ("unmerge alone", _ms(swap["unmerge"]), "", "", ""),
        (
            "decode 16x1, 4 adapters, gather",
            _ms(gather["gather"]),
            "no batch " + _ms(gather["no_batch"]),
            _pct(gather["gather_vs_no_batch"]),
            f"<= {GATHER_TARGET_PCT:.0f}%: {_verdict(overhead <= GATHER_TARGET_PCT)}",
        ),
        (
            "  same rows packed by adapter",
            _ms(gather["gather_packed"]),
            "no batch " + _ms(gather["packed_no_batch"]),
            _pct(gather["gather_packed_vs_no_batch"]),
            "",
        ),
        (
            "decode 16x1, wrapped, no batch",
            _ms(gather["wrapped_no_batch"]),
            "unwrapped " + _ms(gather["unwrapped"]),
            _pct(gather["wrapped_vs_unwrapped"]),
            "~0%",
        ),
        ("build_batch (host, once a step)", _ms(gather["build_batch"]), "", "", ""),
        (
            "slot buffers (4 slots x r16)",
            f"{memory['slot_buffers_mb']:.1f} MB",
            f"base model {model_mb:.0f} MB",
            f"{memory['slot_buffers_mb'] / model_mb:.1%}",
            "",
        ),
        (
            "merge buffers (while merged)",
            f"{memory['merge_buffers_mb']:.1f} MB",
            f"base model {model_mb:.0f} MB",
            f"{memory['merge_buffers_mb'] / model_mb:.1%}",
            "",
        ),
    ]


def _ms(summary: dict) -> str:
    return f"{summary['median_ms']:.2f} ms"


def _ratio(c: dict) -> str:
    return f"x{c['paired_ratio']:.3f} (medians x{c['ratio']:.3f})"


def _pct(c: dict) -> str:
    return f"{c['paired_overhead_pct']:+.1f}% (medians {c['overhead_pct']:+.1f}%)"


def _verdict(passed: bool) -> str:
    return "ok" if passed else "MISSED"


def print_table(rows: list[tuple[str, ...]]) -> None:
    header = ("measurement", "loraserve", "reference", "paired ratio", "target")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def run(repeats: int, profile: bool, kernel_choice: str) -> dict:
    machine = machine_info()
    base = load_base_model().model
    unwrapped = copy.deepcopy(base)  # before wrapping: the reference for PEFT and for base forwards
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        with torch.inference_mode(False):
            dirs = make_peft_adapters(unwrapped, Path(tmp))
            peft_model = load_peft_model(unwrapped, dirs)
        lm, slots = load_slots(base, dirs, kernel_choice)
        swap = bench_swap(lm, slots, peft_model, repeats)
        del peft_model
        gather = bench_gather(lm, unwrapped, slots, repeats)
        memory = bench_memory(lm, slots[0])
        if profile:
            profile_ops(lm, slots)
    machine["load_average_1m_after"] = os.getloadavg()[0]  # includes this run
    config = {
        "repeats": repeats,
        "warmup": WARMUP,
        "num_adapters": NUM_ADAPTERS,
        "rank": RANK,
        "kernel_choice": kernel_choice,
        "targets": TARGETS,
        "num_rows": NUM_ROWS,
        "context_len": CONTEXT_LEN,
        "num_layers": lm.model.config.num_hidden_layers,
    }
    return {"machine": machine, "config": config, "swap": swap, "gather": gather, "memory": memory}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed repeats per measurement, after warm-up")
    parser.add_argument("--out", type=Path, default=None, help="where to write the JSON results")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 0 keeps torch's default (see the module docstring)",
    )
    parser.add_argument("--profile", action="store_true", help="also print torch.profiler tables")
    parser.add_argument(
        "--kernel-choice",
        choices=(PACKED, PLAIN),
        default=PLAIN,
        help="packed: oneDNN-packed base weights (the engine's default)",
    )
    args = parser.parse_args()
    out = args.out or (
        DEFAULT_OUT.with_name("adapter_ops_packed.json") if args.kernel_choice == PACKED else DEFAULT_OUT
    )
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # raised inside PEFT
    results = run(args.repeats, args.profile, args.kernel_choice)
    print_table(table_rows(results))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {out}")
    warn_if_contended(results["machine"])


def warn_if_contended(machine: dict) -> None:
    load = machine["load_average_1m_before"]  # the load after includes this run's own threads
    if load >= 1.0 and machine["torch_threads"] > 1:
        print(
            f"note: load average {load:.1f} on {machine['cpu_count']} cores with "
            f"{machine['torch_threads']} torch threads: timings are unreliable, try --threads 1"
        )


if __name__ == "__main__":
    main()
