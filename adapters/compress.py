"""Serve an adapter at the rank it really uses: truncate each layer's update to its best rank-k
approximation (truncated SVD), refactored into new A and B, and write it back as a plain PEFT
adapter that PEFT itself loads to the same weights.

Each layer keeps its own k = min(max_rank, effective rank at `energy`); the written config gives
every module its rank and an alpha equal to it (scale 1) through rank_pattern/alpha_pattern, so
the scale lives in B and no rsLoRA or alpha arithmetic has to survive the round trip.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import save as save_safetensors_bytes

from .analysis import delta_svd, effective_rank
from .config import CONFIG_FILE
from .errors import InvalidAdapterError, UnsupportedAdapterError
from .peft_format import WEIGHTS_FILE, AdapterSource, LoraWeights, read_factors


@dataclass(frozen=True)
class CompressionReport:
    """What a compression kept: parameter counts, and the fraction of Σσ² (over all layers) kept."""

    rank_before: int
    rank: int  # the largest k
    params_before: int
    params_after: int
    energy_kept: float
    ranks: dict[str, int]  # module -> k

    def as_dict(self) -> dict:
        return asdict(self)


def check_compression(energy: float | None, max_rank: int | None) -> None:
    """Typed errors naming the field: 0 < energy <= 1, max_rank >= 1, and at least one given."""
    if energy is None and max_rank is None:
        raise InvalidAdapterError("give energy, max_rank or both", field="energy")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise InvalidAdapterError(f"must be a fraction in (0, 1], got {energy}", field="energy")
    if max_rank is not None and max_rank < 1:
        raise InvalidAdapterError(f"must be a positive integer, got {max_rank}", field="max_rank")


def truncate(weights: LoraWeights, energy: float | None, max_rank: int | None) -> tuple[LoraWeights, float, float]:
    """The best approximation of ΔW at rank k, as new factors splitting √σ between A and B (float64),
    with the σ² it keeps and the σ² it had."""
    svd = delta_svd(weights)
    k = len(svd.s) if energy is None else effective_rank(svd.s, energy)
    k = max(1, min(k, max_rank or k))  # a zero update still keeps one (zero) rank: its module stays targeted
    root = svd.s[:k].sqrt()  # [k]
    a = root[:, None] * svd.v[:, :k].T  # [k, in]
    b = root[:, None] * svd.u[:, :k].T  # [k, out]
    power = svd.s.square()
    return LoraWeights(a, b), float(power[:k].sum()), float(power.sum())


def compress_factors(
    factors: Mapping[str, LoraWeights], energy: float | None, max_rank: int | None
) -> tuple[dict[str, LoraWeights], CompressionReport]:
    check_compression(energy, max_rank)
    compressed, kept, total = {}, 0.0, 0.0
    for module, weights in sorted(factors.items()):
        compressed[module], layer_kept, layer_total = truncate(weights, energy, max_rank)
        kept, total = kept + layer_kept, total + layer_total
    report = CompressionReport(
        rank_before=max(w.a.shape[0] for w in factors.values()),
        rank=max(w.a.shape[0] for w in compressed.values()),
        params_before=_num_params(factors),
        params_after=_num_params(compressed),
        energy_kept=kept / total if total else 1.0,
        ranks={module: w.a.shape[0] for module, w in compressed.items()},
    )
    return compressed, report


def peft_files(raw_config: dict, factors: Mapping[str, LoraWeights]) -> dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors for `factors` (B holding the whole scale)."""
    ranks = {re.escape(module): w.a.shape[0] for module, w in factors.items()}  # exact names, as regexes
    top = max(ranks.values())
    config = {
        **raw_config,
        "r": top,
        "lora_alpha": top,
        "use_rslora": False,
        "rank_pattern": ranks,
        "alpha_pattern": dict(ranks),
    }
    tensors = {}
    for module, w in factors.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = w.a.float().contiguous()  # [k, in]
        tensors[f"base_model.model.{module}.lora_B.weight"] = w.b.T.float().contiguous()  # [out, k]
    return {
        CONFIG_FILE: json.dumps(config, indent=2).encode(),
        WEIGHTS_FILE: save_safetensors_bytes(tensors, metadata={"format": "pt"}),
    }


def compress_files(
    source: AdapterSource, *, energy: float | None = None, max_rank: int | None = None
) -> tuple[dict[str, bytes], CompressionReport]:
    """Read an adapter (directory or upload), compress it, and return the new PEFT files' bytes."""
    raw_config, config, factors = read_factors(source)
    for flag in ("use_dora", "lora_bias"):  # the refactored B·A would drop the magnitudes or biases
        if getattr(config, flag):
            raise UnsupportedAdapterError(
                f"adapters with {flag} cannot be compressed; upload it without energy or max_rank",
                file=CONFIG_FILE,
                field=flag,
            )
    compressed, report = compress_factors(factors, energy, max_rank)
    return peft_files(raw_config, compressed), report


def compress_dir(
    source: str | Path, dest: str | Path, *, energy: float | None = None, max_rank: int | None = None
) -> CompressionReport:
    """`loraserve adapters compress IN OUT`: the same, written as a PEFT directory at `dest`."""
    files, report = compress_files(Path(source), energy=energy, max_rank=max_rank)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (dest / name).write_bytes(data)
    return report


def _num_params(factors: Mapping[str, LoraWeights]) -> int:
    return sum(w.a.numel() + w.b.numel() for w in factors.values())
