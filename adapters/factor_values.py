"""A LoRA factor's values as a device slot holds them, and whether they stay finite there.

A parse keeps A and B as the file has them (views, any float dtype); a slot casts them to its dtype
and folds B's scale in as it loads them. The parse checks that what the slot will hold is finite
without computing it: casting and scaling are monotone, so a factor's extremes decide.
"""

from __future__ import annotations

import torch


def slot_values(tensor: torch.Tensor, scale: float, dtype: torch.dtype, out: torch.Tensor | None = None):
    """A factor as a slot holds it: cast to `dtype`, and B's scale folded in as float32 products
    (the same products whatever the file's dtype), cast once. `out`: the slot rows to write."""
    if scale == 1.0:
        return tensor.to(dtype) if out is None else out.copy_(tensor)
    if out is None:
        return torch.mul(tensor.float(), scale).to(dtype)
    return torch.mul(tensor.to(out.device).float(), scale, out=out)  # float32 products, cast as written


def loads_finite(tensor: torch.Tensor, scale: float, dtype: torch.dtype) -> bool:
    """Whether every value of `tensor` stays finite as a slot loads it (`slot_values`): NaN and Inf
    in the file, and values finite there that overflow once scaled and cast (fp16 tops out at
    65504). Scaling and casting are monotone, so the extremes decide (a NaN makes both NaN)."""
    return tensor.numel() == 0 or extremes_finite(torch.stack(torch.aminmax(tensor)), scale, dtype)


def extremes_finite(extremes: torch.Tensor, scale: float, dtype: torch.dtype) -> bool:
    """Whether values within [min, max] = `extremes` all stay finite as a slot loads them."""
    return all_finite(slot_values(extremes, scale, dtype))


def all_finite(tensor: torch.Tensor) -> bool:
    """torch.isfinite(tensor).all(), one pass instead of two and no bool tensor for the common case:
    a NaN or Inf anywhere makes the sum non-finite, so a finite sum proves every value finite; a
    non-finite sum (or an overflowing one) is settled by the exact check."""
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())
