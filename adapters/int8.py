"""Weight-only int8 for the frozen base: symmetric, one scale per output channel (QLoRA-style
serving: W0 quantized, adapters in the model's own precision).

The matmul is aten's `_weight_int8pack_mm(x, q [out, in], scales [out])`. Its CPU kernel is fast
only for bf16 activations (fp32 ones take a scalar path), so activations are cast to bf16 for it
and the result back to the model's dtype. It reads out of bounds (a crash or garbage) unless
`in` is a multiple of 16, so such layers stay in full precision. Dequantized W0 = q * scale, with
the scale as stored (bf16), is what every other reader of W0 sees: merges, DoRA norms, copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

INT8_IN_MULTIPLE = 16  # the CPU kernel's inner-dimension block
KERNEL_DTYPE = torch.bfloat16  # activations and scales for the int8 kernel
_int8_op = getattr(torch.ops.aten, "_weight_int8pack_mm", None)  # absent from older torch builds
_int8_mm = _int8_op.default if _int8_op is not None else None


class QuantizationError(RuntimeError):
    """The requested quantization cannot run here (device, kernel); the message says why."""


@dataclass
class Int8Weight:
    """W0 as int8 values [out, in] and per-output-channel scales [out] (bf16)."""

    q: torch.Tensor  # [out, in] int8
    scales: torch.Tensor  # [out] KERNEL_DTYPE

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

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, in] (KERNEL_DTYPE) @ W0ᵀ -> [N, out] (KERNEL_DTYPE)."""
        return _int8_mm(x, self.q, self.scales)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes


def can_quantize(in_features: int) -> bool:
    return in_features % INT8_IN_MULTIPLE == 0


def check_int8_kernel(device: torch.device) -> None:
    """Raise QuantizationError unless the int8 kernel runs on `device` and gives the right numbers."""
    if _int8_mm is None:
        raise QuantizationError(f"--quantization int8: this torch build ({torch.__version__}) has no int8 "
                                "weight-only kernel (aten._weight_int8pack_mm)")
    weight = torch.arange(-16, 16, dtype=torch.float32).repeat(3, 1)  # [3, 32]
    weight[:, 0] = 127  # scale 1: quantization is exact, so is the expected product
    x = torch.ones(2, 32)
    expected = x @ weight.T
    try:
        packed = Int8Weight.quantize(weight.to(device))
        got = packed.matmul(x.to(device, KERNEL_DTYPE)).float().cpu()
    except (RuntimeError, NotImplementedError) as exc:
        raise QuantizationError(f"--quantization int8: no int8 weight-only kernel on device {device.type!r} "
                                f"in this torch build ({torch.__version__}): {exc}") from exc
    if not torch.allclose(got, expected, rtol=1e-2):
        raise QuantizationError(f"--quantization int8: the int8 kernel on device {device.type!r} gives wrong "
                                "results in this torch build; serve without quantization")
