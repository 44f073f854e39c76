"""The kernel plan: which kernel runs each base weight of a model on this machine.

Which kernel wins depends on the CPU, the dtype, the weight's shape and the row count (a packed
matmul's fixed cost per call may not hide behind one row; a library's bf16 path is slow on some
CPUs; the int8 kernel loses to dequantizing at many rows), so nothing is fixed in code:
- `measure` (kernel_timing.py) times each candidate of the device's backend on one weight shape,
  reading the weight from memory as a forward over many layers does;
- `decide` turns the timings into a rule (one kernel, or one below N rows and the other from N);
- `plan_for` brackets each weight's measurement with a reference the machine times quietly
  (quiet_check.py), re-measures a weight while it does not, and caches the rules per machine
  (plan_cache.py) as final only when it stayed quiet: a later start reuses a final plan and
  measures a provisional one again (`loraserve kernels show|refresh`);
- `apply_kernel_plan` gives each wrapped linear its kernels, quantizing first where asked.
Measured tables: benchmarks/results/base_precision.json.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from . import native
from .backends import backend_for
from .blocks import Q4_1, Q8_0, can_pack
from .kernel_timing import MEASURED_ON, NoisyMeasurement, candidates, measure
from .kernels import (
    DENSE_WEIGHT,
    DEQUANTIZED,
    INT8_WEIGHT,
    KERNEL_DTYPE,
    PACKED,
    PLAIN,
    KernelPlan,
    KernelRule,
    QuantizationError,
    WeightKey,
    can_quantize,
)
from .layer import LoraLinear
from .plan_cache import KernelRules, Timings, final_rules, plan_path, read_plan, recorded_best, write_plan
from .quiet_check import REFERENCE, QuietCheck

log = logging.getLogger(__name__)

AUTO = "auto"
KERNEL_CHOICES = (AUTO, PACKED, PLAIN)  # EngineSettings.kernel_choice: measured, or one kernel for all
QUANTIZATIONS = ("none", "int8", "q4_1")
QUANTIZE_HEAD = False  # see quantized_kind
MEASUREMENT = "cold-weights, huge pages"  # how `measure` times: a plan measured another way is not reused
SPLIT_MARGIN = 0.03  # keep two kernels (two weights) only if it beats the best single one by this much
MAX_ATTEMPTS = 3  # tries at measuring one weight while the machine is busy, before the plan is left provisional
PAUSE_SECONDS = 1.0  # between tries: a bounded cost at startup, no CPU taken from the load


def quantized_kind(module: nn.Module, is_head: bool, quantization: str | None) -> str | None:
    """What `module` (an nn.Linear or a LoraLinear) runs on under `quantization`: "int8", blocks.py's
    "q4_1" or "q8_0", or None (full precision). Never GPT-2's Conv1D ([in, out]).

    int8: not the output head unless QUANTIZE_HEAD: its W0 stays resident anyway (a tied embedding
    reads it, saved copies are compared with it), so an int8 copy only replaces its packed one;
    measured (benchmarks/results/base_precision.json), that made fp32 decoding faster but let the
    head's per-row int8 error reach the logits undamped, and gained nothing in bf16.
    q4_1: llama.cpp's Q4_1 file layout, the linears Q4_1 and the head Q8_0 (groups of 32: a finer
    grid than int8's rows), each where its shape packs into blocks (blocks.can_pack).
    """
    if not isinstance(module, (nn.Linear, LoraLinear)) or getattr(module, "is_conv1d", False):
        return None
    if quantization == "int8" and (QUANTIZE_HEAD or not is_head) and can_quantize(module.in_features):
        return INT8_WEIGHT
    if quantization == "q4_1" and can_pack(module.out_features, module.in_features):
        return Q8_0 if is_head else Q4_1
    return None


def weight_keys(model: nn.Module, quantization: str | None = None) -> list[WeightKey]:
    """The distinct weights of an unwrapped model's linears a plan needs rules for, by shape:
    every full-precision weight (W0s, and the merged weights even of quantized layers) and quantized W0s."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys = set()
    for module in model.modules():
        if type(module) is nn.Linear:  # Conv1D runs its own kernel, not planned
            keys.add((DENSE_WEIGHT, module.out_features, module.in_features))
            kind = quantized_kind(module, module is head, quantization)
            if kind is not None:
                keys.add((kind, module.out_features, module.in_features))
    return sorted(keys)


def choose_kernels(model: nn.Module, kernel_choice: str, quantization: str | None, cache_dir: Path) -> KernelPlan:
    """The plan for `kernel_choice`: one kernel for every full-precision weight, or (auto) rules
    measured per weight shape where the backend measures, packed elsewhere. Changes no weight."""
    if kernel_choice not in KERNEL_CHOICES:
        raise ValueError(f"kernel_choice must be one of {', '.join(KERNEL_CHOICES)}, not {kernel_choice!r}")
    load_native_kernels(model.device, quantization, cache_dir)
    if kernel_choice != AUTO:
        return KernelPlan(kernel_choice)
    return KernelPlan(PACKED, plan_kernels(model, quantization, cache_dir) or {})


def load_native_kernels(device: torch.device, quantization: str | None, cache_dir: Path) -> None:
    """Int8 or q4_1 on CPU: our row kernels (native.py), built here once. The int8 one is a candidate
    of the plan, so the plan's identity (which names the candidates) depends on it: whatever reads or
    measures an int8 plan calls this first, as `serve` does; q4_1's blocks run on nothing else. The
    compiled step's quantized matmuls too."""
    if quantization in ("int8", "q4_1") and device.type == "cpu":
        native.load_row_kernels(cache_dir)


def apply_kernel_plan(layers: Iterable[LoraLinear], plan: KernelPlan, quantization: str | None = None) -> None:
    """Give each layer its kernels by `plan`; quantize its W0 first where asked."""
    if quantization not in (None, *QUANTIZATIONS):
        raise QuantizationError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    layers = list(layers)
    scratch: dict[tuple, torch.Tensor] = {}  # dequantized W0, shared by the layers of one shape and dtype
    kinds = {layer: quantized_kind(layer, layer.is_head, quantization) for layer in layers}
    for kind in {kind for kind in kinds.values() if kind is not None}:
        device = next(layer for layer, k in kinds.items() if k == kind).device
        if kind == INT8_WEIGHT:
            backend_for(device).check_int8(device)
        else:
            backend_for(device).check_blocks(device)
    for layer in layers:
        shape, kind = (layer.out_features, layer.in_features), kinds[layer]
        layer.use_kernels(plan.rule_for((DENSE_WEIGHT, *shape)))
        if kind is None:
            continue
        rule = plan.rule_for((kind, *shape))
        dtype = KERNEL_DTYPE if kind == INT8_WEIGHT else layer.dtype  # the dequantized matmul's (cpu.py)
        if DEQUANTIZED in rule.kernels and (shape, dtype) not in scratch:
            scratch[shape, dtype] = torch.empty(shape, dtype=dtype, device=layer.device)
        layer.quantize(kind, rule, scratch.get((shape, dtype)), keep_weight=layer.is_head)


@dataclasses.dataclass(frozen=True)
class MeasuredPlan:
    """The plan a start runs: the rules of a quiet measurement (else none: every weight runs the
    default), the file it is cached in, whether it is final there, and whether this start's own
    measurement (if it made one) was judged noisy."""

    path: Path
    rules: KernelRules
    is_final: bool
    is_noisy: bool = False


def plan_kernels(model: nn.Module, quantization: str | None, cache_dir: Path) -> KernelRules | None:
    """Rules per weight shape for `model`'s linears, from the cache or measured now; None where the
    device's backend does not measure (each weight then runs the plan's default)."""
    if not backend_for(model.device).is_measured:
        return None
    return plan_for(weight_keys(model, quantization), model.dtype, cache_dir).rules


def plan_identity(keys: Sequence[WeightKey], dtype: torch.dtype) -> dict:
    """What a cached plan must match to apply: the machine, torch, threads, dtype, weight shapes and,
    with int8 weights, the int8 kernels it chose between (a build of ours may be there or not)."""
    int8 = {"int8_kernels": list(candidates(INT8_WEIGHT))} if any(key[0] == INT8_WEIGHT for key in keys) else {}
    return {
        "method": MEASUREMENT,
        "cpu": backend_for(MEASURED_ON).machine_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": [list(key) for key in keys],
        **int8,
    }  # key order is part of the cache file's name


def plan_for(keys: Sequence[WeightKey], dtype: torch.dtype, cache_dir: Path, *, refresh: bool = False) -> MeasuredPlan:
    """The final plan cached for `keys`, else (or with `refresh`) one measured now and cached: as
    final if the machine stayed quiet, else as provisional (never over a final one), and this
    start runs the default kernels rather than rules that load may have skewed."""
    identity = plan_identity(keys, dtype)
    path = plan_path(cache_dir, identity)
    saved = read_plan(path, identity)
    rules = final_rules(saved)
    if rules is not None and not refresh:
        log.info("base kernels (cached in %s): %s", path, KernelPlan(rules=rules))
        return MeasuredPlan(path, rules, is_final=True)
    return _measure_and_cache(keys, dtype, cache_dir, identity, kept=rules)


def _measure_and_cache(
    keys: Sequence[WeightKey], dtype: torch.dtype, cache_dir: Path, identity: dict, kept: KernelRules | None
) -> MeasuredPlan:
    """Measure now and cache the plan, final if it was quiet; a noisy one never replaces `kept`."""
    path = plan_path(cache_dir, identity)
    log.info(
        "measuring base kernels: %d weight shapes on %s, %d threads", len(keys), identity["cpu"], identity["threads"]
    )
    started = time.perf_counter()
    check = QuietCheck(recorded_best(cache_dir, identity, REFERENCE))
    timings, brackets = measure_quietly(keys, dtype, check)
    conditions = check.conditions(brackets) | {"seconds": round(time.perf_counter() - started, 2)}
    conditions["quiet"] = is_quiet = conditions["quiet"] and len(timings) == len(keys)
    measured = {key: decide(by_kernel) for key, by_kernel in timings.items()}
    if is_quiet or kept is None:
        write_plan(path, identity, conditions, measured, timings)
    if is_quiet:
        log.info(
            "base kernels (measured in %.1f s, cached in %s): %s",
            conditions["seconds"],
            path,
            KernelPlan(rules=measured),
        )
        return MeasuredPlan(path, measured, is_final=True)
    log.warning(
        "base kernel timings are noisy (the reference ran up to %.1fx its best and %.1fx its one-thread time; "
        "bounds %s): %s",
        conditions["max_slowdown"],
        conditions["max_parallel_ratio"],
        conditions["bounds"],
        f"the final plan in {path} is kept"
        if kept
        else f"this start runs the default kernels, and the next measures again ({path} is provisional)",
    )
    return MeasuredPlan(path, kept or {}, is_final=kept is not None, is_noisy=True)


def measure_quietly(keys: Sequence[WeightKey], dtype: torch.dtype, check: QuietCheck) -> tuple[dict, list]:
    """Timings per weight whose measurement quiet brackets of the reference open, close and
    interrupt every CHECK_SECONDS, up to MAX_ATTEMPTS tries each (a noisy bracket ends the try, and
    the next starts after PAUSE_SECONDS); stops at a weight still noisy then, so a busy machine
    costs seconds, not a plan's worth of timings. Returns them and the brackets they are judged on."""
    timings, accepted = {}, set()  # accepted: indices of the brackets of the kept measurements

    def still_quiet() -> bool:
        return check.is_quiet(check.bracket())

    check.bracket()  # opens the first weight; each weight's closing bracket opens the next
    for key in keys:
        for attempt in range(MAX_ATTEMPTS):
            if attempt:
                time.sleep(PAUSE_SECONDS)  # a burst of load from elsewhere may pass
                check.bracket()
            opened = len(check.brackets) - 1
            if check.is_quiet(check.brackets[opened]):
                try:
                    timings[key] = measure(key, dtype, still_quiet=still_quiet)
                except NoisyMeasurement:
                    continue
                if check.is_quiet(check.bracket()):
                    accepted.update(range(opened, len(check.brackets)))
                    break
                del timings[key]
        else:
            return timings, check.brackets  # judged on every bracket taken, which show the noise
    return timings, [check.brackets[index] for index in sorted(accepted)]


def decide(timings: Timings) -> KernelRule:
    """The rule with the least total time relative to the best kernel at each measured row count;
    a split (two kernels, both weights resident) only when it beats the best single kernel by
    SPLIT_MARGIN, and among near-equal single kernels the first in preference order."""
    preference = (*candidates(DENSE_WEIGHT), *candidates(INT8_WEIGHT), *candidates(Q4_1))
    names = sorted(timings, key=preference.index)
    row_counts = sorted(set().union(*timings.values()))
    best = {rows: min(timings[name][rows] for name in names if rows in timings[name]) for rows in row_counts}

    def cost(rule: KernelRule) -> float:  # a kernel not measured at a row count is not run there
        return sum(
            timings[rule.small if rows < rule.from_rows else rule.large].get(rows, math.inf) / best[rows]
            for rows in row_counts
        )

    singles = [KernelRule.single(name) for name in names]
    best_single_cost = min(cost(rule) for rule in singles)
    single = next(rule for rule in singles if cost(rule) <= best_single_cost * (1 + SPLIT_MARGIN))
    splits = [
        KernelRule(small, large, rows)
        for small in names
        for large in names
        if small != large
        for rows in row_counts[1:]
    ]
    split = min(splits, key=cost, default=None)  # min keeps the first of equal costs: deterministic
    if split is not None and cost(split) < cost(single) * (1 - SPLIT_MARGIN):
        return split
    return single
