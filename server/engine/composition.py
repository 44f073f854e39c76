"""Per-request composition: several adapters with scales on one request, h = W0·x + Σ scaleᵢ·ΔWᵢ.

A composed request binds each adapter's current version, as a plain request binds its one, and holds
all their slots at once while it runs; its rows become one term per adapter in the step's LoraBatch
(the slot buffers are shared, so nothing is copied). Metrics and logs label it COMPOSED_LABEL.
"""
from __future__ import annotations

import hashlib
import math
import struct

import torch

from adapters import AdapterRegistry, AdapterVersion

from .errors import RequestError

Composition = tuple[tuple[str, float], ...]  # ((adapter name, scale), ...), as the request gave them
COMPOSED_LABEL = "__composed__"
_DOMAIN = b"loraserve/composition/v1\0"


class NamedComposition(tuple):
    """A composition registered under a name (POST /v1/adapters with `compose`): the same terms,
    and metrics and logs label its requests by that name rather than COMPOSED_LABEL."""

    label: str

    def __new__(cls, label: str, terms: Composition) -> "NamedComposition":
        composition = super().__new__(cls, terms)
        composition.label = label
        return composition


def bind_terms(registry: AdapterRegistry, composition: Composition, max_loras: int) -> list[tuple[AdapterVersion, float]]:
    """Bind every adapter's current version (unknown name: AdapterNotFoundError, nothing kept bound).

    Refused, naming the field `adapters`: more adapters than device slots (it could never run),
    non-finite scales, and DoRA adapters, whose magnitude normalises W0 + ΔW as a whole: a weighted
    sum of DoRA updates is not any adapter's output, and PEFT defines none; likewise adapters with
    full module copies (modules_to_save), which replace a module rather than add a delta.
    """
    if not composition:
        raise RequestError("must name at least one adapter", field="adapters")
    if len(composition) > max_loras:
        raise RequestError(f"{len(composition)} adapters cannot share a row: the server holds {max_loras} "
                           "in device slots (setting max_loras)", field="adapters")
    terms: list[tuple[AdapterVersion, float]] = []
    max_scale = max_composition_scale(registry.lora_model.dtype)
    try:
        for index, (name, scale) in enumerate(composition):
            check_scale(scale, max_scale, f"adapters[{index}].scale")
            version = registry.bind(name)
            terms.append((version, float(scale)))
            if version.adapter is not None and version.adapter.is_dora:
                raise RequestError(f"adapter {name!r} is a DoRA adapter, which cannot be composed: its "
                                   "magnitude normalises its own W0 + ΔW", field=f"adapters[{index}].name")
            if version.adapter is not None and version.adapter.modules:
                raise RequestError(f"adapter {name!r} replaces whole modules (modules_to_save), which cannot "
                                   "be scaled or summed with others", field=f"adapters[{index}].name")
    except Exception:
        for version, _ in terms:
            registry.unbind(version)
        raise
    return terms


def max_composition_scale(dtype: torch.dtype) -> float:
    """The largest |scale| a step can carry: the model dtype's largest finite number. Past it the
    scale overflows when the step writes it into a tensor, which would fail every row of that step."""
    return float(torch.finfo(dtype).max)


def check_scale(scale: float, max_scale: float, field: str) -> None:
    if not math.isfinite(scale):
        raise RequestError("scales must be finite numbers", field=field)
    if abs(scale) > max_scale:
        raise RequestError(f"|scale| must be at most {max_scale:.4g}, the largest number the model's dtype "
                           "holds", field=field)


def composed_identity(terms: list[tuple[AdapterVersion, float]]) -> bytes:
    """What the composition computes, for the prefix cache: its adapters' identities and scales, in order."""
    h = hashlib.sha256(_DOMAIN)
    for version, scale in terms:
        h.update(version.identity)
        h.update(struct.pack("<d", scale))
    return h.digest()
