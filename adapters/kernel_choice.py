"""Choose the base kernels per weight shape on this machine, by timing them.

Which kernel wins depends on the CPU, the dtype, the weight's shape and the row count (oneDNN's
packed matmul has a fixed cost per call that one row may not hide; MKL's bf16 path is slow on some
CPUs; the int8 kernel loses to dequantizing at many rows), so nothing is fixed in code: `measure`
times each candidate at a few row counts, interleaved, medians of short repeats, cycling through
enough copies of the weight that every call reads it from memory, as a forward over many layers
does (timing one weight over and over measures it in cache: there MKL won one-row calls on the AMD
box, yet in the model's forward the same choice halved one-stream speed, 30 vs 53 tokens/s); `decide` turns the
timings into a rule (one kernel, or one below N rows and the other from N), deterministically.
The server caches the result per machine (server/engine/kernel_plan.py); measured tables are in
benchmarks/results/base_precision.json.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence

import torch

from .base_kernels import DENSE_WEIGHT, INT8_WEIGHT, WeightKey
from .int8 import KERNEL_DTYPE, Int8Weight
from .kernels import DENSE_KERNELS, INT8_KERNELS, KernelRule, dense_kernel, int8_kernel

ROW_COUNTS = (1, 16, 64)  # a decode step of one sequence, of a small batch, of a large batch or a prefill chunk
NUM_REPEATS = 7
MIN_SAMPLE_SECONDS = 2e-4  # calls per sample: timer overhead stays well under 1% of a sample
SPLIT_MARGIN = 0.03  # keep two kernels (two weights) only if it beats the best single one by this much
COLD_BYTES = 128 << 20  # weight copies cycled per measurement: more than a server CPU's last-level cache
MAX_COPIES = 1024  # a tiny weight (tests) needs no more to leave the small caches
Timings = Mapping[str, Mapping[int, float]]  # kernel -> rows -> median seconds per call


def candidates(kind: str) -> tuple[str, ...]:
    """In preference order for a tie: the first needs the least memory."""
    return DENSE_KERNELS if kind == DENSE_WEIGHT else INT8_KERNELS


_PREFERENCE = (*DENSE_KERNELS, *INT8_KERNELS)


@torch.inference_mode()
def measure(key: WeightKey, dtype: torch.dtype, row_counts: Sequence[int] = ROW_COUNTS,
            num_repeats: int = NUM_REPEATS) -> dict[str, dict[int, float]]:
    """Median seconds per call of each candidate kernel for weight `key` on random data, on CPU."""
    kind, out_features, in_features = key
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
    copies = [weight] + [weight.clone() for _ in range(min(MAX_COPIES, math.ceil(COLD_BYTES / weight.nbytes)) - 1)]
    kernels = {name: [_kernel(kind, name, w, dtype) for w in copies] for name in candidates(kind)}
    inputs = {rows: torch.randn(rows, in_features, generator=generator).to(dtype) for rows in row_counts}
    calls = {rows: _calls_per_sample(kernels, inputs[rows]) for rows in row_counts}
    samples = {name: {rows: [] for rows in row_counts} for name in kernels}
    for _ in range(num_repeats):  # interleaved: a burst of load from elsewhere hits every candidate alike
        for rows in row_counts:
            for name, kernel in kernels.items():
                samples[name][rows].append(_time(kernel, inputs[rows], calls[rows]))
    return {name: {rows: statistics.median(values) for rows, values in by_rows.items()}
            for name, by_rows in samples.items()}


def decide(timings: Timings) -> KernelRule:
    """The rule with the least total time relative to the best kernel at each measured row count;
    a split (two kernels, both weights resident) only when it beats the best single kernel by
    SPLIT_MARGIN, and among near-equal single kernels the first in preference order."""
    names = sorted(timings, key=_PREFERENCE.index)
    row_counts = sorted(next(iter(timings.values())))
    best = {rows: min(timings[name][rows] for name in names) for rows in row_counts}

    def cost(rule: KernelRule) -> float:
        return sum(timings[rule.small if rows < rule.from_rows else rule.large][rows] / best[rows]
                   for rows in row_counts)

    singles = [KernelRule.single(name) for name in names]
    best_single_cost = min(cost(rule) for rule in singles)
    single = next(rule for rule in singles if cost(rule) <= best_single_cost * (1 + SPLIT_MARGIN))
    splits = [KernelRule(small, large, rows) for small in names for large in names if small != large
              for rows in row_counts[1:]]
    split = min(splits, key=cost, default=None)  # min keeps the first of equal costs: deterministic
    if split is not None and cost(split) < cost(single) * (1 - SPLIT_MARGIN):
        return split
    return single


def _kernel(kind: str, name: str, weight: torch.Tensor, dtype: torch.dtype):
    rule = KernelRule.single(name)
    if kind == INT8_WEIGHT:
        scratch = torch.empty(weight.shape, dtype=KERNEL_DTYPE)
        return int8_kernel(rule, Int8Weight.quantize(weight), None, dtype, scratch)
    return dense_kernel(rule, weight, None)


def _calls_per_sample(kernels: dict, x: torch.Tensor) -> int:
    """At least one pass over the copies, and enough calls that the timer's overhead is noise."""
    copies = len(next(iter(kernels.values())))
    slowest = max(_time(copies_of, x, copies) for copies_of in kernels.values() for _ in range(2))  # 1st: warm-up
    return max(copies, int(MIN_SAMPLE_SECONDS / max(slowest, 1e-9)))


def _time(copies: list, x: torch.Tensor, calls: int) -> float:
    """Seconds per call, each call on the next copy of the weight (so it comes from memory)."""
    started = time.perf_counter()
    for call in range(calls):
        copies[call % len(copies)](x)
    return (time.perf_counter() - started) / calls
