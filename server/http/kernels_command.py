"""`loraserve kernels show|refresh`: the kernel plan that `serve` with the same settings runs here.

Reads the model's config only (its linears' shapes on the meta device), never its weights, so it
takes a second where no measurement is due; `refresh` measures as a start would (kernel_plan.py).
With `--quantization int8` or `q4_1` on CPU it builds our row kernels first where `serve` has not
yet (~10-20 s, once): candidates of the plan, so part of the identity that names the plan's file.
"""

from __future__ import annotations

import json
import logging
import sys

import torch

from adapters import kernel_plan
from adapters.backends import backend_for
from adapters.plan_cache import is_final, plan_path, read_plan
from server.engine.model_loader import ModelLoadError, default_cache_dir, load_model_shapes

from .settings import Settings


def show_kernel_plan(settings: Settings, *, refresh: bool) -> int:
    """Print the cached plan and its conditions as JSON, measuring it first with `refresh`; exit
    status 1 where none is final, or where the refresh was too noisy to become final."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the measurement's verdict, on stderr
    shown = {"kernel_choice": settings.kernel_choice, "device": settings.device}
    if not backend_for(torch.device(settings.device)).is_measured:
        print(json.dumps({**shown, "status": "not measured: every weight runs the default kernel"}, indent=2))
        return 0
    try:
        model = load_model_shapes(
            settings.model, dtype=settings.dtype, device=settings.device, cache_dir=settings.cache_dir
        )
    except ModelLoadError as exc:
        print(f"loraserve: {exc}", file=sys.stderr)
        return 1
    keys, cache_dir = kernel_plan.weight_keys(model, settings.quantization), settings.cache_dir or default_cache_dir()
    kernel_plan.load_native_kernels(torch.device(settings.device), settings.quantization, cache_dir)
    is_noisy = refresh and kernel_plan.plan_for(keys, model.dtype, cache_dir, refresh=True).is_noisy
    identity = kernel_plan.plan_identity(keys, model.dtype)
    path = plan_path(cache_dir, identity)
    saved = read_plan(path, identity)
    status = "final" if is_final(saved) else "provisional" if saved else "none"
    print(json.dumps({**shown, "status": status, "path": str(path), **(saved or {})}, indent=2))
    if status == "none":
        print(
            "loraserve: no kernel plan is cached for these settings; `loraserve kernels refresh` measures one",
            file=sys.stderr,
        )
    return 0 if status == "final" and not is_noisy else 1
