"""A request's adapter, one value from the HTTP edge to the slots: `AdapterRef`.

A reference is a label (what metrics and logs call it) and weighted terms, h = W0·x + Σ scaleᵢ·ΔWᵢ.
The base is `BASE_REF` (no terms); a plain adapter is one term at scale 1.0 labelled by its name; a
composition, from the `adapters` field or a named composition, is several. The engine binds each
term's current adapter version once, at admission (`bind`), and keeps those versions through
preemption and recompute; the scheduler then holds all of its slots at once or none.
"""

from __future__ import annotations

import hashlib
import math
import struct
from dataclasses import dataclass

import torch

from adapters import AdapterRegistry, AdapterVersion
from adapters.identity import BASE_IDENTITY

from .errors import RequestError

COMPOSED_LABEL = "__composed__"  # metrics and logs label of a composition sent in the request
_DOMAIN = b"loraserve/composition/v1\0"

Term = tuple[str, float]  # (adapter name, scale)
BoundTerm = tuple[AdapterVersion, float]  # the version a term bound at admission, and its scale


@dataclass(frozen=True)
class AdapterRef:
    """What a request asks for: `terms` on the base, labelled `label` (None: the base)."""

    label: str | None
    terms: tuple[Term, ...] = ()
    is_composition: bool = False  # composition rules apply (no DoRA, no module copies, bounded scales)

    @classmethod
    def named(cls, name: str | None) -> AdapterRef:
        """The base (None) or one adapter by name."""
        return BASE_REF if name is None else cls(name, ((name, 1.0),))

    @classmethod
    def composed(cls, terms: tuple[Term, ...] | list[Term], label: str = COMPOSED_LABEL) -> AdapterRef:
        return cls(label, tuple((name, float(scale)) for name, scale in terms), is_composition=True)

    @classmethod
    def of(cls, value: AdapterRef | str | None | tuple[Term, ...] | list[Term]) -> AdapterRef:
        """A reference from what scripts and tests pass: a reference, a name, None, or (name, scale) terms."""
        if isinstance(value, AdapterRef):
            return value
        if value is None or isinstance(value, str):
            return cls.named(value)
        return cls.composed(value)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.terms]


BASE_REF = AdapterRef(None)


def bind(registry: AdapterRegistry, ref: AdapterRef, max_loras: int) -> tuple[BoundTerm, ...]:
    """Bind every term's current version (unknown name: AdapterNotFoundError; nothing kept bound).

    A composition is refused, naming the field `adapters`, when it has more adapters than device
    slots (it could never run), a scale that is not finite or past what the model dtype holds (it
    would overflow inside the step, failing every row), a DoRA adapter (its magnitude normalises
    its own W0 + ΔW: a weighted sum of DoRA updates is not any adapter's output, and PEFT defines
    none) or an adapter with full module copies (modules_to_save replace a module, not add to it).
    """
    if ref.is_composition:
        _check_composition(ref, max_loras, max_composition_scale(registry.lora_model.dtype))
    bound: list[BoundTerm] = []
    try:
        for index, (name, scale) in enumerate(ref.terms):
            version = registry.bind(name)
            bound.append((version, scale))
            if ref.is_composition:
                _check_composable(version, index)
    except Exception:
        for version, _ in bound:
            registry.unbind(version)
        raise
    return tuple(bound)


def identity(bound: tuple[BoundTerm, ...], ref: AdapterRef) -> bytes:
    """What the request computes, for the prefix cache: the base, one version's identity, or a
    composition's adapters' identities and scales, in order."""
    if not bound:
        return BASE_IDENTITY
    if not ref.is_composition:
        return bound[0][0].identity
    h = hashlib.sha256(_DOMAIN)
    for version, scale in bound:
        h.update(version.identity)
        h.update(struct.pack("<d", scale))
    return h.digest()


def max_composition_scale(dtype: torch.dtype) -> float:
    """The largest |scale| a step can carry: the model dtype's largest finite number. Past it the
    scale overflows when the step writes it into a tensor, which would fail every row of that step."""
    return float(torch.finfo(dtype).max)


def check_scale(scale: float, max_scale: float, field: str) -> None:
    if not math.isfinite(scale):
        raise RequestError("scales must be finite numbers", field=field)
    if abs(scale) > max_scale:
        raise RequestError(
            f"|scale| must be at most {max_scale:.4g}, the largest number the model's dtype holds", field=field
        )


def _check_composition(ref: AdapterRef, max_loras: int, max_scale: float) -> None:
    if not ref.terms:
        raise RequestError("must name at least one adapter", field="adapters")
    if len(ref.terms) > max_loras:
        raise RequestError(
            f"{len(ref.terms)} adapters cannot share a row: the server holds {max_loras} "
            "in device slots (setting max_loras)",
            field="adapters",
        )
    for index, (_, scale) in enumerate(ref.terms):
        check_scale(scale, max_scale, f"adapters[{index}].scale")


def _check_composable(version: AdapterVersion, index: int) -> None:
    adapter = version.adapter
    if adapter is not None and adapter.is_dora:
        raise RequestError(
            f"adapter {version.name!r} is a DoRA adapter, which cannot be composed: its "
            "magnitude normalises its own W0 + ΔW",
            field=f"adapters[{index}].name",
        )
    if adapter is not None and adapter.modules:
        raise RequestError(
            f"adapter {version.name!r} replaces whole modules (modules_to_save), which cannot "
            "be scaled or summed with others",
            field=f"adapters[{index}].name",
        )
