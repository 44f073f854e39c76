"""The base matmul of a LoRA layer: the kernels that multiply rows by W0 (or by a merged weight),
the rule that says which kernel runs a weight, and the plan that gives every weight its rule.

A kernel is a small callable, made once per weight (at load, at merge), so a forward makes no
choice beyond a row-count compare. Kernels have names; a device's backend (backends/) makes the
callable for a name on its device. Which name wins where depends on the machine: kernel_plan.py
measures it, decides a rule per weight shape and applies the plan to a wrapped model.

Full-precision weights run `plain` (F.linear) or `packed` (a copy laid out once for a faster
library kernel, one more copy in memory); an int8 W0 runs `int8` (aten's GEMV-style kernel, fast for a
few rows), `int8-rows` (ours, native.py: streams W0's rows at one row, where it is built) or
`dequantized` (W0 dequantized into a scratch buffer for one matmul, fast for many). A W0 in Q4_1 or
Q8_0 blocks (blocks.py) runs `block-rows` (ours, native.py) or `dequantized`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F

from .blocks import Q4_1, Q8_0

PLAIN, PACKED, INT8, INT8_ROWS, DEQUANTIZED = "plain", "packed", "int8", "int8-rows", "dequantized"
BLOCK_ROWS = "block-rows"
DENSE_WEIGHT, INT8_WEIGHT = "dense", "int8"  # how a weight is stored: the kinds a plan has rules for,
BLOCK_WEIGHTS = (Q4_1, Q8_0)  # and blocks.py's
WeightKey = tuple[str, int, int]  # (a kind above, out_features, in_features)
Kernel = Callable[[torch.Tensor], torch.Tensor]  # x [.., in] -> x @ Wᵀ + bias [.., out]
KERNEL_DTYPE = torch.bfloat16  # activations and scales of the int8 kernels
INT8_IN_MULTIPLE = 16  # the int8 kernel's inner-dimension block: it reads out of bounds otherwise
# An unmeasured plan's switch from our block kernel to the dequantized matmul (the crossover measured
# 128-512 rows on the Intel Xeon; the plan measures up to 64, where ours wins)
BLOCK_ROWS_UNTIL = 256


class QuantizationError(RuntimeError):
    """The requested quantization cannot run here (device, kernel); the message says why."""


@dataclass(frozen=True)
class KernelRule:
    """For one weight: one kernel for every call, or `small` for calls of fewer than `from_rows`
    rows and `large` from there on (both stay resident: one more copy of the weight)."""

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


@dataclass(frozen=True)
class KernelPlan:
    """The rule of every base weight of a model: the measured rule for its key where there is one,
    else `default` for full-precision weights, the int8 kernel for int8 ones, and ours for blocks
    below BLOCK_ROWS_UNTIL rows (the dequantized matmul from there)."""

    default: str = PLAIN
    rules: Mapping[WeightKey, KernelRule] = field(default_factory=dict)

    def rule_for(self, key: WeightKey) -> KernelRule:
        if key in self.rules:
            return self.rules[key]
        if key[0] in BLOCK_WEIGHTS:
            return KernelRule(BLOCK_ROWS, DEQUANTIZED, BLOCK_ROWS_UNTIL)
        return KernelRule.single(INT8 if key[0] == INT8_WEIGHT else self.default)

    def __str__(self) -> str:
        """One line per weight shape, for the startup log."""
        measured = "; ".join(f"{kind} [{out}x{inp}]: {rule}" for (kind, out, inp), rule in sorted(self.rules.items()))
        return measured or f"{self.default} for every full-precision weight"


@dataclass
class Int8Weight:
    """W0 as int8 values [out, in] and per-output-channel scales [out]: weight-only, symmetric
    (QLoRA-style serving: W0 quantized, adapters in the model's own precision). Dequantized
    W0 = q * scale, with the scale as stored (bf16), is what every other reader of W0 sees:
    merges, DoRA norms, per-row copies."""

    q: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] KERNEL_DTYPE
    kind = "int8"

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        """Symmetric per output channel: scale = amax / 127, q = round(w / scale)."""
        w = weight.detach().float()  # [out, in]
        scales = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(KERNEL_DTYPE)
        q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """q * scale in `dtype` ([out, in]); into `out` when given (a merge buffer, a scratch)."""
        if out is None:
            out = torch.empty(self.q.shape, dtype=dtype, device=self.q.device)
        return torch.mul(self.q, self.scales.to(dtype)[:, None], out=out)

    @cached_property
    def float_scales(self) -> torch.Tensor:
        """The scales in float32, as our int8 row kernel reads them (native.py): made once."""
        return self.scales.float()

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes


def can_quantize(in_features: int) -> bool:
    return in_features % INT8_IN_MULTIPLE == 0


class PlainLinear:
    """F.linear on the weight as it is (no extra copy): whatever the device's library does."""

    packed = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias  # [out, in], [out]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv1dLinear:
    """GPT-2's Conv1D: weight [in, out]. Not planned: GPT-2 is a test architecture, not a target."""

    packed = None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.in_features, self.out_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)


class RowSwitch:
    """A split rule's kernel: `small` below `from_rows` rows, `large` from there."""

    def __init__(self, small, large, from_rows: int, in_features: int):
        self.small, self.large, self.from_numel = small, large, from_rows * in_features
        self.packed = large.packed if large.packed is not None else small.packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.large(x) if x.numel() >= self.from_numel else self.small(x)


def by_rule(rule: KernelRule, make: Callable[[str], Kernel], in_features: int) -> Kernel:
    """The kernel that runs `rule`: `make(name)` builds each named kernel, one or two of them."""
    if len(rule.kernels) == 1:
        return make(rule.large)
    return RowSwitch(make(rule.small), make(rule.large), rule.from_rows, in_features)
