"""Base weights pre-packed for oneDNN: the CPU fast path for the frozen base's linear layers.

On CPU, `F.linear` in fp32 goes to MKL, which packs the weight into its kernel's panel layout on
every call and, on AMD CPUs, runs AVX2 kernels. oneDNN can take a weight reordered once into its
blocked layout and run AVX-512 kernels on it. Measured on the project's 2-core AMD EPYC box, for
the default model's 210 linear layers: 2.2x faster at 16, 50 and 512 rows, and 3.6x for the
[50, 576] x [576, 49152] output head. The base weights are frozen, so packing once at load is
free per token; the price is one extra copy of each packed weight in memory.
(The same reordered-weight ops serve torch.compile's CPU freezing pass.)
"""
from __future__ import annotations

import torch

PACK_ROWS_HINT = 64  # oneDNN picks the blocked layout for this many rows; any row count works


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN-blocked copy of a [out, in] weight, or None where the fast path does not apply."""
    if not can_pack(weight):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W.T + bias with W pre-packed by `pack`; same result as F.linear up to fp32 rounding."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
