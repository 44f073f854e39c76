"""W0 quantized in groups of 32 inputs with llama.cpp's codes, laid out for our block kernels
(block_kernels.cpp: the layout is in its header).

Q4_1: each group's 32 weights as 4-bit q in 0..15 with a float16 scale d and minimum m (w = d·q + m),
5 bits a weight; Q8_0: int8 q with a float16 scale (w = d·q), 8.5 bits. Quantizing takes each group's
minimum and range (Q4_1) or largest magnitude (Q8_0), as llama.cpp's reference quantizers do, so a
model loaded from a GGUF file of these types gets its file's codes back exactly (the default model:
Q4_1 layers and a Q8_0 head, all 4.2 million groups; tests/adapters/test_blocks.py): serving it so
reads llama.cpp's bytes and computes with the weights the full-precision model holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import native

ROWS, GROUP = 16, 32  # a block's output rows, a group's inputs
Q4_1, Q8_0 = "q4_1", "q8_0"
_CODE_BYTES = {Q4_1: 256, Q8_0: 512}  # a block's codes per group; then float16 scales (and minimums)
BLOCK_BYTES = {Q4_1: 320, Q8_0: 544}
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what our dequantizing kernel writes


def kind_of(blocks: torch.Tensor) -> str:
    """The kind of a blocks tensor, by its bytes per block and group (the compiled step's inputs are bare tensors)."""
    return next(kind for kind, size in BLOCK_BYTES.items() if size == blocks.shape[-1])


def can_pack(out_features: int, in_features: int) -> bool:
    return out_features % ROWS == 0 and in_features % GROUP == 0


@dataclass
class BlockWeight:
    """W0 [out, in] as blocks [out / 16, in / 32, bytes] of `kind`'s codes and scales."""

    blocks: torch.Tensor  # uint8
    kind: str

    @property
    def shape(self) -> tuple[int, int]:
        return self.blocks.shape[0] * ROWS, self.blocks.shape[1] * GROUP

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    @classmethod
    def quantize(cls, weight: torch.Tensor, kind: str) -> BlockWeight:
        out_features, in_features = weight.shape
        if not can_pack(out_features, in_features):
            raise ValueError(f"{kind}: a weight's rows must be a multiple of {ROWS} and its inputs of {GROUP}")
        w = weight.detach().float().reshape(out_features // ROWS, ROWS, in_features // GROUP, GROUP).transpose(1, 2)
        if kind == Q4_1:  # [blocks, groups, rows, 32]
            low, high = w.amin(-1), w.amax(-1)
            scale, minimum = ((high - low) / 15).half(), low.half()
            q = (w - minimum.float()[..., None]) / _nonzero(scale)[..., None]
            codes = _q4_codes(torch.round(q).clamp_(0, 15).to(torch.uint8))
            tail = (scale, minimum)
        elif kind == Q8_0:
            scale = (w.abs().amax(-1) / 127).half()
            q = torch.round(w / _nonzero(scale)[..., None]).clamp_(-127, 127).to(torch.int8)
            codes, tail = _pairs(q).view(torch.uint8), (scale,)
        else:
            raise ValueError(f"unknown block kind {kind!r}: {Q4_1} or {Q8_0}")
        if not all(torch.isfinite(t).all() for t in tail):
            raise ValueError(f"{kind}: a group's scale overflows float16")
        tail_bytes = [t.contiguous().view(torch.uint8) for t in tail]  # [blocks, groups, 32] each
        return cls(torch.cat([codes, *tail_bytes], dim=-1).contiguous(), kind)

    def dequantize(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """W0 [out, in] in `dtype`, into `out` when given: by our kernel where it is built (one pass:
        the dequantized matmul runs this per call), else by torch ops."""
        if out is None:
            out = torch.empty(self.shape, dtype=dtype, device=self.blocks.device)
        op = native.dequantize_blocks_op()
        if op is not None and self.blocks.device.type == "cpu" and out.is_contiguous() and dtype in _KERNEL_DTYPES:
            op(self.blocks, out)
            return out
        return out.copy_(self._dequantized())

    def _dequantized(self) -> torch.Tensor:
        nb, ng, _ = self.blocks.shape
        codes_bytes = _CODE_BYTES[self.kind]
        codes = self.blocks[..., :codes_bytes]
        scale = self.blocks[..., codes_bytes : codes_bytes + 32].contiguous().view(torch.float16).float()
        if self.kind == Q4_1:
            minimum = self.blocks[..., codes_bytes + 32 :].contiguous().view(torch.float16).float()
            w = _q4_values(codes).float() * scale[..., None] + minimum[..., None]
        else:
            w = _unpair(codes.contiguous().view(torch.int8)).float() * scale[..., None]
        return w.transpose(1, 2).reshape(nb * ROWS, ng * GROUP)  # [blocks, groups, rows, 32] -> [out, in]


def _nonzero(scale: torch.Tensor) -> torch.Tensor:
    """The scale as float32, 1 where it is 0 (a constant group: its codes are 0 whatever it divides by)."""
    s = scale.float()
    return torch.where(s == 0, torch.ones_like(s), s)


def _pairs(q: torch.Tensor) -> torch.Tensor:
    """[.., rows, 32] -> [.., 16 pairs v, rows, 2]: the codes of inputs (2v, 2v + 1) of each row side by side."""
    return q.unflatten(-1, (GROUP // 2, 2)).transpose(-3, -2).flatten(-3)


def _unpair(codes: torch.Tensor) -> torch.Tensor:
    return codes.unflatten(-1, (GROUP // 2, ROWS, 2)).transpose(-3, -2).flatten(-2)


def _q4_codes(q: torch.Tensor) -> torch.Tensor:
    """Pairs v < 8 in the low nibbles, pair v + 8 in the high ones of the same bytes."""
    pairs = _pairs(q).unflatten(-1, (2, 8 * ROWS * 2))
    return pairs[..., 0, :] | (pairs[..., 1, :] << 4)


def _q4_values(codes: torch.Tensor) -> torch.Tensor:
    return _unpair(torch.cat([codes & 0x0F, codes >> 4], dim=-1))
