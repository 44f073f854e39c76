"""The CPU backend: MKL for `plain`, oneDNN-packed weights for `packed`, aten's int8 kernel.

Packed: on CPU, `F.linear` goes to MKL, which packs the weight into its kernel's panel layout on
every call and, on AMD CPUs, runs AVX2 kernels (in bf16, a slow path). oneDNN can take a weight
reordered once into its blocked layout and run AVX-512 (bf16: AVX512-BF16 or AMX) kernels on it.
The base weights are frozen, so packing once at load is free per token; the price is one extra
copy of each packed weight. Whether packing wins depends on the CPU, the dtype and the row count,
so the plan measures it (kernel_plan.py); figures in benchmarks/results/ name their machine.
(The same reordered-weight ops serve torch.compile's CPU freezing pass.)

Int8: aten's `_weight_int8pack_mm(x, q [out, in], scales [out])`. Its CPU kernel is fast only for
bf16 activations (fp32 ones take a scalar path), so activations are cast to bf16 for it and the
result back to the model's dtype; it reads out of bounds unless `in` is a multiple of 16
(kernels.can_quantize). `int8-rows` is ours (native.py), a candidate where it was built: the same
contract, the activations taken in the model's dtype (rounded to bf16 inside, no cast op), W0's
rows streamed near the memory's bandwidth at one row.
`dequantized` trades them for one bf16 matmul on a scratch copy of W0.

Blocks (Q4_1, Q8_0: blocks.py): `block-rows` is ours (native.py, which they need: without it they are
refused at startup), `dequantized` one matmul in the model's dtype on a scratch copy of W0.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F

from .. import native
from ..blocks import Q4_1, BlockWeight
from ..kernels import (
    BLOCK_ROWS,
    DEQUANTIZED,
    INT8,
    INT8_ROWS,
    KERNEL_DTYPE,
    PACKED,
    PLAIN,
    Int8Weight,
    Kernel,
    KernelRule,
    PlainLinear,
    QuantizationError,
)

PACK_ROWS_HINT = 64  # oneDNN picks the blocked layout for this many rows; any row count works


def _packable_dtypes() -> frozenset[torch.dtype]:
    """fp32 always; bf16 where oneDNN has bf16 kernels for this CPU (it says so itself)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return frozenset()
    bf16 = hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return frozenset({torch.float32, torch.bfloat16} if bf16 else {torch.float32})


PACKABLE_DTYPES = _packable_dtypes()
_linear_pointwise = torch.ops.mkldnn._linear_pointwise.default if PACKABLE_DTYPES else None
_int8_op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)  # absent from older torch builds
_int8_mm = _int8_op.default if _int8_op is not None else None


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


def int8_matmul(x: torch.Tensor, weight: Int8Weight) -> torch.Tensor:
    """x [N, in] (KERNEL_DTYPE) @ W0ᵀ -> [N, out] (KERNEL_DTYPE); aten dispatches on the device."""
    return _int8_mm(x, weight.q, weight.scales)


def check_int8_kernel(device: torch.device) -> None:
    """Raise QuantizationError unless the int8 kernel runs on `device` and gives the right numbers."""
    if _int8_mm is None:
        raise QuantizationError(
            f"--quantization int8: this torch build ({torch.__version__}) has no int8 "
            "weight-only kernel (aten._weight_int8pack_mm)"
        )
    weight = torch.arange(-16, 16, dtype=torch.float32).repeat(3, 1)  # [3, 32]
    weight[:, 0] = 127  # scale 1: quantization is exact, so is the expected product
    x = torch.ones(2, 32)
    expected = x @ weight.T
    try:
        got = int8_matmul(x.to(device, KERNEL_DTYPE), Int8Weight.quantize(weight.to(device))).float().cpu()
    except (RuntimeError, NotImplementedError) as exc:
        raise QuantizationError(
            f"--quantization int8: no int8 weight-only kernel on device {device.type!r} "
            f"in this torch build ({torch.__version__}): {exc}"
        ) from exc
    if not torch.allclose(got, expected, rtol=1e-2):
        raise QuantizationError(
            f"--quantization int8: the int8 kernel on device {device.type!r} gives wrong "
            "results in this torch build; serve without quantization"
        )


def cpu_model_name() -> str:
    """/proc/cpuinfo's "model name" (what lscpu shows), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class PackedLinear:
    """oneDNN's matmul on a packed copy of the weight, made once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.packed, self.bias = pack(weight), bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)


class Int8Linear:
    """The int8 kernel on bf16 activations, cast back to the model's dtype (`dtype`)."""

    packed = None

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight, self.bias, self.dtype = weight, bias, dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE).contiguous()  # [N, in]
        y = int8_matmul(rows, self.weight).to(self.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y.add_(self.bias)


class Int8RowsLinear:
    """Our int8 row kernel (native.py) on activations in the model's dtype, the product in it too."""

    packed = None

    def __init__(self, weight: Int8Weight, bias: torch.Tensor | None, op):
        self.weight, self.bias, self.op = weight, bias, op

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x, self.weight.q, self.weight.float_scales, self.bias)


class BlockRowsLinear:
    """Our block kernel (native.py) on activations in the model's dtype, the product in it too."""

    packed = None

    def __init__(self, weight: BlockWeight, bias: torch.Tensor | None, op):
        self.blocks, self.bias, self.op = [weight.blocks], bias, op

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.op(x, self.blocks)[0]
        return y if self.bias is None else y.add_(self.bias)


class DequantizedLinear:
    """W0 dequantized into `scratch` (shared by the layers of one shape), then one matmul in the
    scratch's dtype: bf16 for int8 (its kernels' contract), the model's own for blocks."""

    packed = None

    def __init__(
        self, weight: Int8Weight | BlockWeight, bias: torch.Tensor | None, dtype: torch.dtype, scratch: torch.Tensor
    ):
        self.weight, self.bias, self.dtype, self.scratch = weight, bias, dtype, scratch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.dequantize(self.scratch.dtype, out=self.scratch)  # [out, in]
        y = F.linear(x.to(w.dtype), w).to(self.dtype)
        return y if self.bias is None else y.add_(self.bias)


@dataclass(frozen=True)
class CpuBackend:
    """backends.Backend on CPU. Candidates are in preference order for a tie: the first needs the
    least memory. `packed` falls back to plain where oneDNN cannot take the weight (its dtype, or
    another device: see backends/__init__.py)."""

    is_measured: bool = True
    dense_kernels = (PLAIN, PACKED)
    # Ours widens every weight byte once per row of x: at 64 rows it ran 3-4x slower than the
    # dequantized matmul (Intel Xeon), and timing it there took half the plan's time.
    max_rows_measured = MappingProxyType({INT8_ROWS: 16})

    @property
    def int8_kernels(self) -> tuple[str, ...]:
        return (INT8, INT8_ROWS, DEQUANTIZED) if native.int8_rows_op() is not None else (INT8, DEQUANTIZED)

    def dense(self, kernel: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
        return PackedLinear(weight, bias) if kernel == PACKED and can_pack(weight) else PlainLinear(weight, bias)

    @property
    def block_kernels(self) -> tuple[str, ...]:
        return (BLOCK_ROWS, DEQUANTIZED) if native.block_rows_op(Q4_1) is not None else (DEQUANTIZED,)

    def quantized(
        self,
        kernel: str,
        weight: Int8Weight | BlockWeight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        scratch: torch.Tensor | None,
    ) -> Kernel:
        if kernel == DEQUANTIZED:
            return DequantizedLinear(weight, bias, dtype, scratch)
        if weight.kind != INT8:  # blocks: `block-rows`
            return BlockRowsLinear(weight, bias, native.block_rows_op(weight.kind))
        op = native.int8_rows_op() if kernel == INT8_ROWS and weight.device.type == "cpu" else None
        return Int8Linear(weight, bias, dtype) if op is None else Int8RowsLinear(weight, bias, op)

    def check_int8(self, device: torch.device) -> None:
        check_int8_kernel(device)

    def check_blocks(self, device: torch.device) -> None:
        if device.type != "cpu" or native.block_rows_op(Q4_1) is None:
            where = f"on device {device.type!r}" if device.type != "cpu" else "here (see the log for why)"
            raise QuantizationError(
                f"--quantization q4_1 runs on our block kernels, which are not built {where}; "
                "serve with --quantization int8 or none"
            )

    def gains_from_fusing(self, rule: KernelRule, weight: torch.Tensor) -> bool:
        """oneDNN's packed matmul has a fixed cost per call that one decode row does not hide."""
        return PACKED in rule.kernels and can_pack(weight)

    def machine_name(self) -> str:
        return cpu_model_name()


CPU = CpuBackend()
