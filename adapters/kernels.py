"""The base matmul of a LoRA layer: which kernel multiplies the rows by W0 (or by a merged weight).

A kernel is a small callable, chosen once per weight (at load, at merge), so a forward makes no
choice beyond a row count compare. Full-precision weights run on MKL (`plain`, F.linear) or on a
oneDNN-packed copy (`packed`); an int8 W0 runs on the int8 kernel (`int8`, a GEMV-style kernel,
fast for a few rows) or is dequantized into a scratch buffer for one bf16 matmul (`dequantized`,
faster for many rows). Which wins where depends on the CPU: kernel_choice.py measures it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .int8 import KERNEL_DTYPE, Int8Weight
from .packed import can_pack, pack, packed_linear

PLAIN, PACKED, INT8, DEQUANTIZED = "plain", "packed", "int8", "dequantized"
DENSE_KERNELS, INT8_KERNELS = (PLAIN, PACKED), (INT8, DEQUANTIZED)


@dataclass(frozen=True)
class KernelRule:
    """For one weight: `small` for calls of fewer than `from_rows` rows, `large` from there on."""

    small: str
    large: str
    from_rows: int = 1

    @classmethod
    def single(cls, kernel: str) -> KernelRule:
        return cls(kernel, kernel, 1)

    @property
    def kernels(self) -> frozenset[str]:
        return frozenset({self.large} if self.from_rows <= 1 or self.small == self.large else {self.small, self.large})

    def __str__(self) -> str:
        return self.large if len(self.kernels) == 1 else f"{self.small} below {self.from_rows} rows, then {self.large}"


class PlainLinear:
    packed = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias  # [out, in], [out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.packed, self.bias = pack(weight), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


class Conv1dLinear:
    """GPT-2's Conv1D: weight [in, out]."""

    packed = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


class Int8Linear:
    """The int8 kernel on bf16 activations, cast back to the model's dtype (`dtype`)."""

    packed = None

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight, self.bias, self.dtype = weight, bias, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()  # [N, in]
        y = self.weight.matmul(rows).to(self.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y.add_(self.bias)


class DequantizedLinear:
    """W0 dequantized to bf16 into `scratch` (shared by the layers of one shape), then one matmul."""

    packed = None

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype, scratch: torch.Tensor):
        self.weight, self.bias, self.dtype, self.scratch = weight, bias, dtype, scratch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.dequantize(KERNEL_DTYPE, out=self.scratch)  # [out, in]
        y = F.linear(x.to(KERNEL_DTYPE), w).to(self.dtype)
        return y if self.bias is None else y.add_(self.bias)


class RowSwitch:
    """`small` below `from_rows` rows, `large` from there: both stay resident."""

    def __init__(self, small, large, from_rows: int, in_features: int):
        self.small, self.large, self.from_numel = small, large, from_rows * in_features
        self.packed = large.packed if large.packed is not None else small.packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.large(x) if x.numel() >= self.from_numel else self.small(x)


def dense_kernel(rule: KernelRule, weight: torch.Tensor, bias: torch.Tensor | None):
    """The rule's kernel for a full-precision [out, in] weight; plain where packing does not apply."""
    def make(kind: str):
        return PackedLinear(weight, bias) if kind == PACKED and can_pack(weight) else PlainLinear(weight, bias)
    return _switch(rule, make, weight.shape[1])


def int8_kernel(rule: KernelRule, weight: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype,
                scratch: torch.Tensor | None):
    """The rule's kernel for an int8 W0; `scratch` ([out, in], bf16) is needed only for DEQUANTIZED."""
    def make(kind: str):
        if kind == DEQUANTIZED:
            return DequantizedLinear(weight, bias, dtype, scratch)
        return Int8Linear(weight, bias, dtype)
    return _switch(rule, make, weight.q.shape[1])


def _switch(rule: KernelRule, make, in_features: int):
    if len(rule.kernels) == 1:
        return make(rule.large)
    return RowSwitch(make(rule.small), make(rule.large), rule.from_rows, in_features)
