"""Batched LoRA in a fixed number of launches: every row's own adapter, whatever the mix (Punica's
SGMV idea, written for our slot buffers).

The rows of a step are sorted by adapter slot once per step (`LoraRows`, on the device, no host
sync, so a captured CUDA graph re-sorts them on each replay). Then each LoRA linear runs two Triton
kernels per term: `lora_shrink` h = scale·x·Aᵀ and `lora_expand` y += h·B (+ scale·bias). Each
program takes a block of one slot's rows, so its A or B tile is shared by the block and read from
the slot buffers in place: no gather of weights, no padding to the step's largest group, and a grid
fixed by (rows, slots, terms), never by which adapters the step holds. Slots are zero-padded past
their rank (adapters/slots.py), so heterogeneous ranks need no special case.

On a machine without CUDA the kernels run in Triton's interpreter: that is how their tests run on
CPU. The `*_reference` functions are the same semantics in plain torch, for those tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

# Off CUDA the kernels run only in Triton's interpreter (how their tests run on CPU). triton.jit
# reads the switch as it decorates each kernel (below), so it is set before that, and before the import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the engine falls back to the torch path (llm_engine._step_kernels)
    HAVE_TRITON = False

BLOCK_M = 16  # rows per program: tl.dot's smallest tile
INTERPRETED = False  # set below from what triton.jit made of the kernels


@dataclass(frozen=True)
class LoraRows:
    """A step's rows sorted by adapter slot, per term, as device tensors of fixed shape."""

    token_slots: torch.Tensor  # [K, N] int32: each row's slot in term k, -1 (BASE_SLOT) for none
    token_scales: torch.Tensor  # [K, N] float32
    sorted_rows: torch.Tensor  # [K, N] int32: per term, the rows stable-sorted by slot (base rows first)
    slot_starts: torch.Tensor  # [K, S + 1] int32: slot s's rows are sorted_rows[k, starts[s] : starts[s + 1]]

    @classmethod
    def build(cls, token_slots: torch.Tensor, token_scales: torch.Tensor | None, num_slots: int) -> LoraRows:
        """From [K, N] (or [N]) slots and scales (None: all 1); torch ops only, no host sync."""
        slots = token_slots.reshape(-1, token_slots.shape[-1]).to(torch.int32)
        scales = torch.ones(slots.shape, dtype=torch.float32, device=slots.device)
        if token_scales is not None:
            scales.copy_(token_scales.reshape(slots.shape))
        sorted_rows, slot_starts = _sort(slots, num_slots)
        return cls(slots.clone(), scales, sorted_rows, slot_starts)

    def fill_(self, token_slots: torch.Tensor, token_scales: torch.Tensor | None) -> None:
        """Recompute into these tensors (the static buffers a captured graph reads)."""
        self.token_slots.copy_(token_slots.reshape(self.token_slots.shape))
        if token_scales is None:
            self.token_scales.fill_(1.0)
        else:
            self.token_scales.copy_(token_scales.reshape(self.token_scales.shape))
        sorted_rows, slot_starts = _sort(self.token_slots, self.slot_starts.shape[1] - 1)
        self.sorted_rows.copy_(sorted_rows)
        self.slot_starts.copy_(slot_starts)

    @property
    def num_terms(self) -> int:
        return self.token_slots.shape[0]


def _sort(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by slot, and where each slot's run starts: a searchsorted over the sorted slots
    (bincount would size its output from the data, a host sync)."""
    sorted_slots, order = torch.sort(slots.long(), dim=1, stable=True)
    bounds = torch.arange(num_slots + 1, device=slots.device).expand(slots.shape[0], -1).contiguous()
    starts = torch.searchsorted(sorted_slots, bounds)  # first position whose slot >= s; base rows (-1) sort first
    return order.to(torch.int32), starts.to(torch.int32)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, rows: LoraRows, *, a_transposed: bool = False) -> torch.Tensor:
    """h [K, N, R] in x.dtype: h[k, t] = scale[k, t]·(x[t] @ A[slot]ᵀ), zero for base rows.
    x [N, in]; lora_a [S, R, in] ([S, in, R] if `a_transposed`)."""
    num_terms, (num_rows, in_features) = rows.num_terms, x.shape
    num_slots = lora_a.shape[0]
    rank = lora_a.shape[2] if a_transposed else lora_a.shape[1]
    h = torch.zeros(num_terms, num_rows, rank, dtype=x.dtype, device=x.device)
    stride_rank, stride_in = (lora_a.stride(2), lora_a.stride(1)) if a_transposed else lora_a.stride()[1:]
    grid = (triton.cdiv(num_rows, BLOCK_M), num_slots, num_terms)
    _shrink_kernel[grid](
        x, lora_a, h, rows.sorted_rows, rows.slot_starts, rows.token_scales,
        in_features, rank,
        x.stride(0), lora_a.stride(0), stride_rank, stride_in, h.stride(0), h.stride(1),
        rows.sorted_rows.stride(0), rows.slot_starts.stride(0), rows.token_scales.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=_tile(rank), BLOCK_K=min(64, _tile(in_features)),
        DOT_FP32=_dot_in_fp32(x.dtype),
    )  # fmt: skip
    return h


def lora_expand(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, rows: LoraRows, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """In place on y [N, out]: y[t] += Σ_k h[k, t] @ B[slot] + scale[k, t]·bias[slot]; returns y.
    One launch per term: the terms of a composed row add to the same y rows."""
    num_rows, out_features = y.shape
    num_slots, rank = lora_b.shape[0], lora_b.shape[1]
    block_n = min(64, _tile(out_features))
    grid = (triton.cdiv(num_rows, BLOCK_M), triton.cdiv(out_features, block_n), num_slots)
    for term in range(rows.num_terms):
        _expand_kernel[grid](
            y, h[term], lora_b, bias if bias is not None else lora_b,
            rows.sorted_rows[term], rows.slot_starts[term], rows.token_scales[term],
            out_features, rank,
            y.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1), 0 if bias is None else bias.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=_tile(rank),
            HAS_BIAS=bias is not None, DOT_FP32=_dot_in_fp32(y.dtype),
        )  # fmt: skip
    return y


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 tiles stay fp32 in tl.dot (IEEE, no TF32: as torch's matmul). The interpreter's tl.dot
    multiplies bf16 tiles as their raw uint16 bits (triton 3.9 keeps bf16 as uint16 in numpy), so
    there they go up to fp32 first: exact, a product of two bf16 is exact in fp32. fp16 is a real
    numpy float16 there and keeps the compiled path's own code."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and INTERPRETED)


def _tile(size: int) -> int:
    """A power-of-two tile of at least 16 (tl.dot's minimum) covering `size`."""
    return max(16, triton.next_power_of_2(size))


if HAVE_TRITON:

    @triton.jit
    def _shrink_kernel(
        x, a, h, sorted_rows, slot_starts, scales,
        in_features, rank,
        stride_x, stride_a_slot, stride_a_rank, stride_a_in, stride_h_term, stride_h_row,
        stride_sorted, stride_starts, stride_scales,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        block, slot, term = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(slot_starts + term * stride_starts + slot)
        stop = tl.load(slot_starts + term * stride_starts + slot + 1)
        first = start + block * BLOCK_M
        if first < stop:  # else the slot has no rows this far: nothing to do
            offsets = first + tl.arange(0, BLOCK_M)
            in_rows = offsets < stop
            row = tl.load(sorted_rows + term * stride_sorted + offsets, mask=in_rows, other=0).to(tl.int64)
            r = tl.arange(0, BLOCK_R)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, in_features, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                xs = tl.load(
                    x + row[:, None] * stride_x + k[None, :],
                    mask=in_rows[:, None] & (k[None, :] < in_features),
                    other=0.0,
                )  # [BLOCK_M, BLOCK_K]
                a_t = tl.load(
                    a + slot * stride_a_slot + k[:, None] * stride_a_in + r[None, :] * stride_a_rank,
                    mask=(k[:, None] < in_features) & (r[None, :] < rank),
                    other=0.0,
                )  # [BLOCK_K, BLOCK_R]: Aᵀ, read in place
                if DOT_FP32:  # see _dot_in_fp32
                    acc += tl.dot(xs.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(xs, a_t)
            scale = tl.load(scales + term * stride_scales + row, mask=in_rows, other=0.0)
            acc = acc * scale[:, None]
            tl.store(
                h + term * stride_h_term + row[:, None] * stride_h_row + r[None, :],
                acc.to(h.dtype.element_ty),
                mask=in_rows[:, None] & (r[None, :] < rank),
            )

    @triton.jit
    def _expand_kernel(
        y, h, b, bias, sorted_rows, slot_starts, scales,
        out_features, rank,
        stride_y, stride_h, stride_b_slot, stride_b_rank, stride_bias,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        block, column_block, slot = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        start = tl.load(slot_starts + slot)
        stop = tl.load(slot_starts + slot + 1)
        first = start + block * BLOCK_M
        if first < stop:
            offsets = first + tl.arange(0, BLOCK_M)
            in_rows = offsets < stop
            row = tl.load(sorted_rows + offsets, mask=in_rows, other=0).to(tl.int64)
            r = tl.arange(0, BLOCK_R)
            n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
            in_cols = n < out_features
            hs = tl.load(
                h + row[:, None] * stride_h + r[None, :], mask=in_rows[:, None] & (r[None, :] < rank), other=0.0
            )
            bs = tl.load(
                b + slot * stride_b_slot + r[:, None] * stride_b_rank + n[None, :],
                mask=(r[:, None] < rank) & in_cols[None, :],
                other=0.0,
            )  # [BLOCK_R, BLOCK_N]
            if DOT_FP32:
                delta = tl.dot(hs.to(tl.float32), bs.to(tl.float32), input_precision="ieee")
            else:
                delta = tl.dot(hs, bs)
            if HAS_BIAS:
                scale = tl.load(scales + row, mask=in_rows, other=0.0)
                lora_bias = tl.load(bias + slot * stride_bias + n, mask=in_cols, other=0.0).to(tl.float32)
                delta += scale[:, None] * lora_bias[None, :]
            mask = in_rows[:, None] & in_cols[None, :]
            pointers = y + row[:, None] * stride_y + n[None, :]
            before = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
            tl.store(pointers, (before + delta).to(y.dtype.element_ty), mask=mask)

    # What triton.jit decided (it reads TRITON_INTERPRET, spelled as its version accepts it).
    INTERPRETED = not isinstance(_shrink_kernel, triton.JITFunction)


def lora_shrink_reference(
    x: torch.Tensor, lora_a: torch.Tensor, rows: LoraRows, *, a_transposed: bool = False
) -> torch.Tensor:
    """`lora_shrink` row by row: slow, obviously right."""
    a = lora_a.transpose(1, 2) if a_transposed else lora_a  # [S, R, in]
    h = torch.zeros(rows.num_terms, x.shape[0], a.shape[1], dtype=x.dtype, device=x.device)
    for term in range(rows.num_terms):
        for t, slot in enumerate(rows.token_slots[term].tolist()):
            if slot >= 0:
                h[term, t] = (rows.token_scales[term, t] * (x[t].float() @ a[slot].float().T)).to(x.dtype)
    return h


def lora_expand_reference(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, rows: LoraRows, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`lora_expand` row by row."""
    for term in range(rows.num_terms):
        for t, slot in enumerate(rows.token_slots[term].tolist()):
            if slot >= 0:
                delta = h[term, t].float() @ lora_b[slot].float()
                if bias is not None:
                    delta += rows.token_scales[term, t] * bias[slot].float()
                y[t] = (y[t].float() + delta).to(y.dtype)
    return y
