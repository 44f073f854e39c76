"""Base weights pre-packed for oneDNN: the CPU fast path for the frozen base's linear layers.

On CPU, `F.linear` goes to MKL, which packs the weight into its kernel's panel layout on every
call and, on AMD CPUs, runs AVX2 kernels (in bf16, a slow path). oneDNN can take a weight
reordered once into its blocked layout and run AVX-512 (bf16: AVX512-BF16 or AMX) kernels on it.
The base weights are frozen, so packing once at load is free per token; the price is one extra
copy of each packed weight. Whether packing wins depends on the CPU and the row count, so the
engine measures it per weight shape at startup (kernel_choice.py); figures in
benchmarks/results/ name the machine they came from.
(The same reordered-weight ops serve torch.compile's CPU freezing pass.)
"""
from __future__ import annotations

import torch

PACK_ROWS_HINT = 64  # oneDNN picks the blocked layout for this many rows; any row count works


def _packable_dtypes() -> frozenset[torch.dtype]:
    """fp32 always; bf16 where oneDNN has bf16 kernels for this CPU (it says so itself)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return frozenset()
    bf16 = hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return frozenset({torch.float32, torch.bfloat16} if bf16 else {torch.float32})


PACKABLE_DTYPES = _packable_dtypes()
_linear_pointwise = torch.ops.mkldnn._linear_pointwise.default if PACKABLE_DTYPES else None


def can_pack(weight: torch.Tensor) -> bool:
    return weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN-blocked copy of a [out, in] weight, or None where the fast path does not apply."""
    if not can_pack(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias with W pre-packed by `pack`; same result as F.linear up to rounding."""
    return _linear_pointwise(x, packed, bias, "none", [], "")
