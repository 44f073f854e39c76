"""What an adapter's update learned, after the LoRA paper's Section 7, computed from its factors.

Every layer's update is ΔW = s·B·A ([out, in]), of rank at most r. Its SVD comes from a QR of each
factor and an SVD of the r×r core, O((in + out)·r²), never from the d×k matrix; all in float64,
so singular values far below the largest are still meaningful.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from .config import LoraConfig
from .peft_format import LoraWeights

ENERGIES = (0.9, 0.99, 0.999)  # the effective ranks reported per layer
_NEAR_ZERO = 1e-6  # ‖ΔW‖ / ‖W0‖ below this: the update does nothing (an untrained B, say)
_EXPLODING = 1.0  # ‖ΔW‖ / ‖W0‖ above this: the update outweighs the base weight itself


def module_order(module: str) -> tuple:
    """Sort key that puts layer 2 before layer 10: digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", module))


class DeltaSVD(NamedTuple):
    """Thin SVD of one layer's ΔW = u·diag(s)·vᵀ, singular values in descending order."""

    u: torch.Tensor  # [out, r]
    s: torch.Tensor  # [r]
    v: torch.Tensor  # [in, r]


def delta_svd(weights: LoraWeights) -> DeltaSVD:
    """ΔW = bᵀ·a with a [r, in] and b [r, out] (scale folded in): Bᵀ = Q_b·R_b and Aᵀ = Q_a·R_a,
    so ΔW = Q_b·(R_b·R_aᵀ)·Q_aᵀ and only the r×r core needs an SVD."""
    a, b = weights.a.double(), weights.b.double()
    q_b, r_b = torch.linalg.qr(b.T)  # [out, r], [r, r]
    q_a, r_a = torch.linalg.qr(a.T)  # [in, r], [r, r]
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # [r, r] each
    return DeltaSVD(q_b @ u, s, q_a @ vh.T)


def effective_rank(s: torch.Tensor, energy: float) -> int:
    """The smallest k whose leading σ² sum to at least `energy` of the total (0 for a zero update)."""
    power = s.double().square()
    total = float(power.sum())
    if total == 0.0:
        return 0
    kept = torch.cumsum(power, 0) / total
    # 1e-12: float64 rounding in the cumulative sum must not push an exact fraction one rank further.
    return min(int(torch.searchsorted(kept, energy - 1e-12)) + 1, len(s))


def amplification(svd: DeltaSVD, w0: torch.Tensor) -> float | None:
    """‖ΔW‖_F / ‖Uᵀ·W0·V‖_F (Section 7.3): how much ΔW amplifies directions W0 barely uses.
    None when W0 has no component there at all (the ratio is infinite)."""
    projected = (svd.u.T @ w0.double()) @ svd.v  # [r, r]
    denominator = float(torch.linalg.matrix_norm(projected))
    return float(svd.s.norm()) / denominator if denominator > 0 else None


def analyze_layer(module: str, weights: LoraWeights, scale: float, w0: torch.Tensor) -> dict:
    """One layer's report; `w0` is the base weight as [out, in]."""
    svd = delta_svd(weights)
    delta_norm = float(svd.s.norm())
    return {
        "module": module,
        "rank": int(weights.a.shape[0]),
        "scale": scale,
        "delta_norm": delta_norm,
        "base_norm": float(torch.linalg.matrix_norm(w0.double())),
        "singular_values": svd.s.tolist(),
        "effective_rank": {str(e): effective_rank(svd.s, e) for e in ENERGIES},
        "amplification": amplification(svd, w0),
    }


def analyze(
    name: str, config: LoraConfig, factors: Mapping[str, LoraWeights], base_weight: Callable[[str], torch.Tensor]
) -> dict:
    """The whole adapter: a report per targeted module, and a summary that flags broken ones."""
    layers = [
        analyze_layer(module, weights, config.scale_for(module), base_weight(module))
        for module, weights in sorted(factors.items(), key=lambda item: module_order(item[0]))
    ]
    return {"name": name, "layers": layers, "summary": summarize(layers, factors)}


def summarize(layers: list[dict], factors: Mapping[str, LoraWeights]) -> dict:
    amplifications = [layer["amplification"] for layer in layers if layer["amplification"] is not None]
    return {
        "num_layers": len(layers),
        "rank": max(layer["rank"] for layer in layers),
        "num_params": sum(w.a.numel() + w.b.numel() for w in factors.values()),
        "delta_norm": math.sqrt(sum(layer["delta_norm"] ** 2 for layer in layers)),
        "mean_amplification": sum(amplifications) / len(amplifications) if amplifications else None,
        "effective_rank": {str(e): max(layer["effective_rank"][str(e)] for layer in layers) for e in ENERGIES},
        "warnings": _warnings(layers),
    }


def _warnings(layers: list[dict]) -> list[str]:
    """What an operator should look at: updates that vanish, explode or collapse to rank 1."""

    def modules(pick) -> list[str]:
        return [layer["module"] for layer in layers if pick(layer)]

    checks = [
        ("near-zero update (‖ΔW‖ < 1e-6·‖W0‖)", modules(lambda m: m["delta_norm"] < _NEAR_ZERO * m["base_norm"])),
        (
            "update larger than the base weight (‖ΔW‖ > ‖W0‖)",
            modules(lambda m: m["delta_norm"] > _EXPLODING * m["base_norm"]),
        ),
        (
            "rank collapse (one direction holds 99% of the update)",
            modules(lambda m: m["rank"] > 1 and m["effective_rank"]["0.99"] == 1),
        ),
    ]
    return [f"{what}: {len(found)} layer(s), e.g. {found[0]}" for what, found in checks if found]


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> float:
    """φ = ‖Q1ᵀ·Q2‖²_F / min(r1, r2) (Section 7.2), Q the right-singular vectors of each A ([r, in]):
    1 when one row space contains the other, 0 when they are orthogonal."""
    q1 = torch.linalg.svd(a1.double(), full_matrices=False).Vh  # [r1, in]
    q2 = torch.linalg.svd(a2.double(), full_matrices=False).Vh  # [r2, in]
    return float(torch.linalg.matrix_norm(q1 @ q2.T).square()) / min(len(q1), len(q2))


def similarity(
    name: str, other: str, factors: Mapping[str, LoraWeights], other_factors: Mapping[str, LoraWeights]
) -> dict:
    """φ per module that both adapters target, at their full ranks, and the mean over them."""
    shared = sorted(set(factors) & set(other_factors), key=module_order)
    layers = [{"module": m, "similarity": subspace_similarity(factors[m].a, other_factors[m].a)} for m in shared]
    mean = sum(layer["similarity"] for layer in layers) / len(layers) if layers else None
    return {"name": name, "other": other, "layers": layers, "mean": mean}


def base_weights(layers: Mapping) -> Callable[[str], torch.Tensor]:
    """module -> its W0 as [out, in], from a LoraModel's `layers` (GPT-2's Conv1D stores [in, out])."""

    def weight(module: str) -> torch.Tensor:
        layer = layers[module]
        weight = layer.base_weight().detach().cpu()  # the factors are host tensors, whatever the model's device
        return weight.T if layer.is_conv1d else weight

    return weight
