"""Timing the candidate kernels of one weight shape, as the kernel plan (kernel_plan.py) asks.

Each candidate of the device's backend runs at a few row counts, interleaved, medians of short
repeats, cycling through enough copies of the weight that every call reads it from memory as a
forward over many layers does (timing one weight over and over measures it in cache, and picked a
kernel that halved one-stream decoding in the real model). A `still_quiet` callback is asked every
CHECK_SECONDS, so a measurement the machine's load makes meaningless stops there (quiet_check.py).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from .backends import backend_for, dense_kernel, quantized_kernel
from .blocks import BlockWeight
from .huge_pages import huge_page_copies
from .kernels import DENSE_WEIGHT, INT8_WEIGHT, KERNEL_DTYPE, Int8Weight, KernelRule, WeightKey

MEASURED_ON = torch.device("cpu")  # timings need no device synchronisation here
ROW_COUNTS = (1, 16, 64)  # a decode step of one sequence, of a small batch, of a large batch or a prefill chunk
NUM_REPEATS = 7
MIN_SAMPLE_SECONDS = 2e-4  # calls per sample: timer overhead stays well under 1% of a sample
COLD_BYTES = 128 << 20  # weight copies cycled per measurement: more than a server CPU's last-level cache
MAX_COPIES = 1024  # a tiny weight (tests) needs no more to leave the small caches
CHECK_SECONDS = 0.5  # the reference is timed this often during a weight's measurement (~2% of it)


@torch.inference_mode()
def measure(
    key: WeightKey,
    dtype: torch.dtype,
    row_counts: Sequence[int] = ROW_COUNTS,
    num_repeats: int = NUM_REPEATS,
    still_quiet: Callable[[], bool] = lambda: True,
) -> dict[str, dict[int, float]]:
    """Median seconds per call of each candidate kernel for weight `key` on random data (a
    candidate the backend does not offer at a row count, `max_rows_measured`, has no entry there); asks
    `still_quiet` every CHECK_SECONDS and raises NoisyMeasurement when it says no (under load a
    call can stall for a scheduler tick, and a weight's timing for minutes)."""
    check = _every(CHECK_SECONDS, still_quiet)
    kind, out_features, in_features = key
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.02).to(dtype)
    # on huge pages, as load_base_model puts the weights the kernels will run on
    copies = huge_page_copies([weight] * min(MAX_COPIES, math.ceil(COLD_BYTES / weight.nbytes)))
    kernels = {name: [_kernel(kind, name, w, dtype) for w in copies] for name in candidates(kind)}
    inputs = {rows: torch.randn(rows, in_features, generator=generator).to(dtype) for rows in row_counts}
    limits = backend_for(MEASURED_ON).max_rows_measured
    at_rows = {rows: {name: k for name, k in kernels.items() if rows <= limits.get(name, rows)} for rows in row_counts}
    calls = {rows: _calls_per_sample(at_rows[rows], inputs[rows], check) for rows in row_counts}
    samples = {name: {rows: [] for rows in row_counts if name in at_rows[rows]} for name in kernels}
    for _ in range(num_repeats):  # interleaved: a burst of load from elsewhere hits every candidate alike
        for rows in row_counts:
            for name, kernel in at_rows[rows].items():
                samples[name][rows].append(check(_time(kernel, inputs[rows], calls[rows])))
    return {
        name: {rows: statistics.median(values) for rows, values in by_rows.items()} for name, by_rows in samples.items()
    }


class NoisyMeasurement(Exception):
    """The machine got busy while a weight was being timed: its timings would mislead."""


def _every(seconds: float, still_quiet: Callable[[], bool]) -> Callable:
    """A pass-through that first asks `still_quiet` when `seconds` have passed since it last did."""
    asked = time.perf_counter()

    def check(value):
        nonlocal asked
        if time.perf_counter() - asked >= seconds:
            if not still_quiet():
                raise NoisyMeasurement
            asked = time.perf_counter()
        return value

    return check


def candidates(kind: str) -> tuple[str, ...]:
    backend = backend_for(MEASURED_ON)
    if kind == DENSE_WEIGHT:
        return backend.dense_kernels
    return backend.int8_kernels if kind == INT8_WEIGHT else backend.block_kernels


def _kernel(kind: str, name: str, weight: torch.Tensor, dtype: torch.dtype):
    rule = KernelRule.single(name)
    if kind == INT8_WEIGHT:
        scratch = torch.empty(weight.shape, dtype=KERNEL_DTYPE)
        return quantized_kernel(rule, Int8Weight.quantize(weight), None, dtype, scratch)
    if kind != DENSE_WEIGHT:  # blocks.py's
        scratch = torch.empty(weight.shape, dtype=dtype)
        return quantized_kernel(rule, BlockWeight.quantize(weight, kind), None, dtype, scratch)
    return dense_kernel(rule, weight, None)


def _calls_per_sample(kernels: dict, x: torch.Tensor, check: Callable = lambda value: value) -> int:
    """At least one pass over the copies, and enough calls that the timer's overhead is noise."""
    copies = len(next(iter(kernels.values())))
    slowest = max(
        check(_time(copies_of, x, copies)) for copies_of in kernels.values() for _ in range(2)
    )  # 1st: warm-up
    return max(copies, int(MIN_SAMPLE_SECONDS / max(slowest, 1e-9)))


def _time(copies: list, x: torch.Tensor, calls: int) -> float:
    """Seconds per call, each call on the next copy of the weight (so it comes from memory)."""
    started = time.perf_counter()
    for call in range(calls):
        copies[call % len(copies)](x)
    return (time.perf_counter() - started) / calls
