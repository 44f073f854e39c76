"""The base kernels for this machine: measured once (adapters/kernel_choice.py), then cached as
JSON under the cache dir, keyed by what the choice depends on (CPU model, torch version, threads,
dtype, shapes), so a later start on the same machine skips the measurement."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from adapters.base_kernels import KernelPlan, WeightKey, describe, weight_keys
from adapters.kernel_choice import decide, measure
from adapters.kernels import KernelRule

from .config import EngineConfig
from .model_loader import default_cache_dir

log = logging.getLogger(__name__)

AUTO, PACKED, PLAIN = "auto", "packed", "plain"  # EngineConfig.kernel_choice
MEASUREMENT = "cold-weights"  # how kernel_choice measures: a plan measured another way is not reused


def cpu_model_name() -> str:
    """/proc/cpuinfo's "model name" (what lscpu shows), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def base_kernel_options(model: nn.Module, config: EngineConfig) -> dict:
    """wrap_model's kernel and quantization arguments for `config`."""
    pack_weights = config.pack_weights and config.kernel_choice != PLAIN
    quantization = None if config.quantization == "none" else config.quantization
    plan = None
    if pack_weights and config.kernel_choice == AUTO:
        plan = plan_kernels(model, quantization, config.cache_dir or default_cache_dir())
    return dict(pack_weights=pack_weights, quantization=quantization, kernels=plan)


def plan_kernels(model: nn.Module, quantization: str | None, cache_dir: Path) -> KernelPlan | None:
    """Rules per weight shape for `model`'s linears, from the cache or measured now; None off CPU
    (packing is a CPU path; the int8 kernel is the only one there)."""
    if model.device.type != "cpu":
        return None
    dtype = model.dtype
    keys = weight_keys(model, quantization)
    identity = {"method": MEASUREMENT, "cpu": cpu_model_name(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                "dtype": str(dtype).removeprefix("torch."), "weights": [list(key) for key in keys]}
    path = cache_dir / "kernels" / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]}.json"
    plan = _read(path, identity)
    if plan is not None:
        log.info("base kernels (cached in %s): %s", path, describe(plan))
        return plan
    started = time.perf_counter()
    timings = {key: measure(key, dtype) for key in keys}
    plan = {key: decide(timings[key]) for key in keys}
    _write(path, identity, plan, timings)
    log.info("base kernels (measured in %.1f s on %s, cached in %s): %s", time.perf_counter() - started,
             identity["cpu"], path, describe(plan))
    return plan


def _read(path: Path, identity: dict) -> KernelPlan | None:
    try:
        saved = json.loads(path.read_text())
        if saved["identity"] != identity:  # a hash collision, or a file from elsewhere
            return None
        return {_key(entry["weight"]): KernelRule(**entry["rule"]) for entry in saved["rules"]}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged file: measure again, rewrite it
        log.warning("ignoring the kernel cache %s (%s)", path, exc)
        return None


def _write(path: Path, identity: dict, plan: KernelPlan, timings: dict) -> None:
    rules = [{"weight": list(key), "rule": dataclasses.asdict(rule),
              "median_us": {kernel: {str(rows): round(seconds * 1e6, 2) for rows, seconds in by_rows.items()}
                            for kernel, by_rows in timings[key].items()}}
             for key, rule in plan.items()]
    text = json.dumps({"identity": identity, "rules": rules}, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
            file.write(text)
        os.replace(file.name, path)  # atomic: replicas starting together never read half a file
    except OSError as exc:  # a read-only cache costs a measurement per start, nothing more
        log.warning("cannot cache the kernel choice in %s (%s)", path, exc)


def _key(weight: list) -> WeightKey:
    kind, out_features, in_features = weight
    return str(kind), int(out_features), int(in_features)
