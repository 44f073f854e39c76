"""Batched LoRA in a fixed number of launches: every row's own adapter, whatever the mix (Punica's
SGMV idea, written for our slot buffers).

The rows of a step are sorted by adapter slot once per step and cut into blocks of up to BLOCK_M
rows of one slot (`LoraRows`, adapters/lora_rows.py: on the device, no host sync, so a captured CUDA
graph re-sorts them on each replay). Then each LoRA linear runs `lora_shrink` h = scale·x·Aᵀ and,
per term, `lora_expand` y += h·B (+ scale·bias). Each program takes one block, so its A or B tile is
shared by the block and read from the slot buffers in place. The work is sized by the step, not by
the slots:
- the grid is (row blocks, ...) where the row blocks are at most (N + d·15) // 16 for d = min(N, S)
  slots in use, not (row blocks × slots);
- each program walks its slot's own rank (a per-layer rank table) in chunks of at most MAX_BLOCK_R,
  so a rank-8 adapter in a rank-64 buffer loads 8 rows of A and B, and no tile outgrows shared memory;
- the shrink splits K until one row fills the GPU's SMs; the block's last split to finish sums the
  splits' fp32 partials in a fixed order (deterministic, no zero-filled h, no atomics into h);
- h is torch.empty: shrink writes exactly the entries expand reads (adapter rows, their own rank).

On a machine without CUDA the kernels run in Triton's interpreter: that is how their tests run on
CPU. The `*_reference` functions are the same semantics in plain torch, for those tests.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .lora_rows import BLOCK_M, LoraRows, max_blocks

__all__ = ["BLOCK_M", "LoraRows", "max_blocks", "lora_shrink", "lora_expand", "KernelLayoutError"]

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

MAX_BLOCK_R = 32  # the rank tile's cap: a rank-512 slot is walked in 16 chunks, never one 512-wide tile
TARGET_PROGRAMS = 132  # the shrink splits K until one row fills this many SMs (an H100's; the device's own on CUDA)
# Off CUDA (the interpreter runs programs one by one, each costing ~1 ms of Python) no split unless a
# test asks for one (the split path's tests replace `target_programs`).
PROGRAMS_OFF_CUDA = 1
INTERPRETED = False  # set below from what triton.jit made of the kernels


class KernelLayoutError(ValueError):
    """A tensor the LoRA kernels write, or a slot buffer they read, is not laid out as they index it."""


@dataclass(frozen=True)
class ShrinkPlan:
    """How the shrink splits K: `num_splits` programs per block, each over `k_per_split` inputs."""

    num_splits: int
    k_per_split: int
    block_k: int

    @classmethod
    def choose(cls, in_features: int, num_blocks: int, num_terms: int, target: int = TARGET_PROGRAMS) -> ShrinkPlan:
        """Enough splits that the grid reaches `target` programs even at one block, each split a
        whole number of 16-wide steps (tl.dot's smallest K)."""
        wanted = triton.cdiv(target, num_blocks * num_terms)
        k_per_split = max(16, in_features // wanted // 16 * 16)
        block_k = next(b for b in (64, 32, 16) if k_per_split % b == 0)
        return cls(triton.cdiv(in_features, k_per_split), k_per_split, block_k)


def target_programs(device: torch.device) -> int:
    """The SMs to fill: the device's own count on CUDA, PROGRAMS_OFF_CUDA elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return PROGRAMS_OFF_CUDA


def rank_tile(max_rank: int) -> int:
    """The rank chunk a program holds at once: the buffer's rank, capped (shared memory; a slot of
    lower rank masks the rest and loops only up to its own rank)."""
    return min(MAX_BLOCK_R, _tile(max_rank))


def _require_unit_stride(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.stride(-1) != 1:
            raise KernelLayoutError(
                f"LoRA kernels need {name} with unit stride in its last dimension, got strides {tensor.stride()}"
            )


def _full_ranks(lora_a: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.full((lora_a.shape[0],), rank, dtype=torch.int32, device=lora_a.device)


def lora_shrink(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    rows: LoraRows,
    *,
    a_transposed: bool = False,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """h [K, N, R] in x.dtype: h[k, t, :rank] = scale[k, t]·(x[t] @ A[slot]ᵀ) for each adapter row t,
    rank its slot's (`ranks` [S] int32 on the device; None: the buffer's R for every slot).
    Nothing else of h is written (torch.empty): `lora_expand` reads only those entries.
    x [N, in]; lora_a [S, R, in] ([S, in, R] if `a_transposed`)."""
    num_terms, (num_rows, in_features) = rows.num_terms, x.shape
    rank = lora_a.shape[2] if a_transposed else lora_a.shape[1]
    if x.stride(-1) != 1:
        x = x.contiguous()  # an input: a copy is correct, if slow
    stride_rank, stride_in = (lora_a.stride(2), lora_a.stride(1)) if a_transposed else lora_a.stride()[1:]
    if min(stride_rank, stride_in) != 1:
        raise KernelLayoutError(f"LoRA kernels need lora_a with unit stride along rank or inputs: {lora_a.stride()}")
    ranks = _full_ranks(lora_a, rank) if ranks is None else ranks
    h = torch.empty(num_terms, num_rows, rank, dtype=x.dtype, device=x.device)
    plan = ShrinkPlan.choose(in_features, rows.row_blocks, num_terms, target_programs(x.device))
    split = plan.num_splits > 1
    partials = h  # [splits, K, N, R] fp32 when split: each split's sum, added up by the block's last split
    if split:
        partials = torch.empty(plan.num_splits, num_terms, num_rows, rank, dtype=torch.float32, device=x.device)
    num_programs = rows.row_blocks * plan.num_splits  # per term; each loops over the (block, split) items used
    _shrink_kernel[(num_programs, num_terms)](
        x, lora_a, h, partials, ranks, rows.sorted_rows, rows.slot_starts, rows.token_scales,
        rows.block_slots, rows.block_firsts, rows.blocks_used, rows.split_counts,
        in_features, plan.k_per_split, plan.num_splits, num_programs,
        x.stride(0), lora_a.stride(0), stride_rank, stride_in, h.stride(0), h.stride(1),
        partials.stride(0), partials.stride(1), partials.stride(2),
        rows.sorted_rows.stride(0), rows.slot_starts.stride(0), rows.token_scales.stride(0), rows.block_slots.stride(0),
        BLOCK_M=BLOCK_M, BLOCK_R=rank_tile(rank), BLOCK_K=plan.block_k, SPLIT=split,
        DOT_FP32=_dot_in_fp32(x.dtype),
    )  # fmt: skip
    return h


def lora_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_b: torch.Tensor,
    rows: LoraRows,
    bias: torch.Tensor | None = None,
    *,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place on y [N, out]: y[t] += Σ_k h[k, t, :rank] @ B[slot, :rank] + scale[k, t]·bias[slot];
    returns y. One launch per term: the terms of a composed row add to the same y rows."""
    num_rows, out_features = y.shape
    rank = lora_b.shape[1]
    _require_unit_stride(y=y, h=h, lora_b=lora_b, bias=bias)
    ranks = _full_ranks(lora_b, rank) if ranks is None else ranks
    block_n = expand_block_n(out_features, rows.row_blocks, target_programs(y.device))
    column_blocks = triton.cdiv(out_features, block_n)
    num_programs = rows.row_blocks * column_blocks  # each loops over the (block, column block) items used
    for term in range(rows.num_terms):
        _expand_kernel[(num_programs,)](
            y, h[term], lora_b, bias if bias is not None else lora_b, ranks,
            rows.sorted_rows[term], rows.slot_starts[term], rows.token_scales[term],
            rows.block_slots[term], rows.block_firsts[term], rows.blocks_used[term : term + 1],
            out_features, column_blocks, num_programs,
            y.stride(0), h.stride(1), lora_b.stride(0), lora_b.stride(1), 0 if bias is None else bias.stride(0),
            BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=rank_tile(rank),
            HAS_BIAS=bias is not None, DOT_FP32=_dot_in_fp32(y.dtype),
        )  # fmt: skip
    return y


def expand_block_n(out_features: int, row_blocks: int, target: int) -> int:
    """The expand's column block: 64 wide, narrower (down to 16) while the grid is short of `target`."""
    block_n = min(64, _tile(out_features))
    while block_n > 16 and row_blocks * triton.cdiv(out_features, block_n) < target:
        block_n //= 2
    return block_n


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
    def _slot_offset(slot, stride):
        """slot·stride in 64 bits: an lm_head's B at rank 64 and a 128K vocabulary passes 2^31
        elements past slot 261, where int32 arithmetic would wrap."""
        return slot.to(tl.int64) * stride

    @triton.jit
    def _block_rows(sorted_rows, slot_starts, block_firsts, slot, block, BLOCK_M: tl.constexpr):
        """The block's rows (int64) and which of its BLOCK_M lanes hold one."""
        first = tl.load(block_firsts + block)
        stop = tl.load(slot_starts + slot + 1)
        offsets = first + tl.arange(0, BLOCK_M)
        in_rows = offsets < stop
        row = tl.load(sorted_rows + offsets, mask=in_rows, other=0).to(tl.int64)
        return row, in_rows

    @triton.jit
    def _shrink_kernel(
        x, a, h, partials, ranks, sorted_rows, slot_starts, scales, block_slots, block_firsts, blocks_used,
        split_counts,
        in_features, k_per_split, num_splits, num_programs,
        stride_x, stride_a_slot, stride_a_rank, stride_a_in, stride_h_term, stride_h_row,
        stride_p_split, stride_p_term, stride_p_row,
        stride_sorted, stride_starts, stride_scales, stride_blocks,
        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """Program p of term k takes the (block, split) items p, p + P, ... of the term's used blocks."""
        term = tl.program_id(1)
        sorted_rows += term * stride_sorted
        slot_starts += term * stride_starts
        scales += term * stride_scales
        block_slots += term * stride_blocks
        block_firsts += term * stride_blocks
        h += term * stride_h_term
        partials += term * stride_p_term
        num_items = tl.load(blocks_used + term) * num_splits
        for item in range(tl.program_id(0), num_items, num_programs):
            block, split = item // num_splits, item % num_splits
            slot = tl.load(block_slots + block)
            row, in_rows = _block_rows(sorted_rows, slot_starts, block_firsts, slot, block, BLOCK_M)
            rank = tl.load(ranks + slot)
            a_slot = a + _slot_offset(slot, stride_a_slot)
            k_first = split * k_per_split
            k_stop = tl.minimum(k_first + k_per_split, in_features)
            scale = tl.load(scales + row, mask=in_rows, other=0.0)
            for r0 in range(0, rank, BLOCK_R):  # this slot's own rank, never the buffer's
                r = r0 + tl.arange(0, BLOCK_R)
                in_rank = r < rank
                acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(k_first, k_stop, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    in_k = k < k_stop
                    x_tile = x + row[:, None] * stride_x + k[None, :]
                    xs = tl.load(x_tile, mask=in_rows[:, None] & in_k[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
                    a_t = tl.load(
                        a_slot + k[:, None] * stride_a_in + r[None, :] * stride_a_rank,
                        mask=in_k[:, None] & in_rank[None, :],
                        other=0.0,
                    )  # [BLOCK_K, BLOCK_R]: Aᵀ, read in place, rows past the slot's rank never loaded
                    if DOT_FP32:  # see _dot_in_fp32
                        acc += tl.dot(xs.to(tl.float32), a_t.to(tl.float32), input_precision="ieee")
                    else:
                        acc += tl.dot(xs, a_t)
                mask = in_rows[:, None] & in_rank[None, :]
                if SPLIT:
                    out = partials + split * stride_p_split + row[:, None] * stride_p_row + r[None, :]
                    tl.store(out, acc, mask=mask)
                else:
                    out = h + row[:, None] * stride_h_row + r[None, :]
                    tl.store(out, (acc * scale[:, None]).to(h.dtype.element_ty), mask=mask)
            if SPLIT:
                # The block's last split to finish sums every split's partial, in split order (the
                # same sum whatever the finishing order, unlike atomic adds into h, which would also
                # need h zeroed first), and resets the count for the next launch or graph replay.
                tl.debug_barrier()  # every lane's partial stored before the count says so
                count = split_counts + term * stride_blocks + block
                if tl.atomic_add(count, 1, sem="acq_rel") == num_splits - 1:
                    tl.atomic_xchg(count, 0)
                    for r0 in range(0, rank, BLOCK_R):
                        r = r0 + tl.arange(0, BLOCK_R)
                        mask = in_rows[:, None] & (r[None, :] < rank)
                        p = partials + row[:, None] * stride_p_row + r[None, :]
                        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                        for j in range(0, num_splits):
                            acc += tl.load(p + j * stride_p_split, mask=mask, other=0.0, cache_modifier=".cg")
                        out = h + row[:, None] * stride_h_row + r[None, :]
                        tl.store(out, (acc * scale[:, None]).to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def _expand_kernel(
        y, h, b, bias, ranks, sorted_rows, slot_starts, scales, block_slots, block_firsts, blocks_used,
        out_features, column_blocks, num_programs,
        stride_y, stride_h, stride_b_slot, stride_b_rank, stride_bias,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """Program p takes the (block, column block) items p, p + P, ... of the term's used blocks."""
        num_items = tl.load(blocks_used) * column_blocks
        for item in range(tl.program_id(0), num_items, num_programs):
            block, column_block = item // column_blocks, item % column_blocks
            slot = tl.load(block_slots + block)
            row, in_rows = _block_rows(sorted_rows, slot_starts, block_firsts, slot, block, BLOCK_M)
            rank = tl.load(ranks + slot)
            b_slot = b + _slot_offset(slot, stride_b_slot)
            n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
            in_cols = n < out_features
            delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for r0 in range(0, rank, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                in_rank = r < rank
                h_tile = h + row[:, None] * stride_h + r[None, :]
                hs = tl.load(h_tile, mask=in_rows[:, None] & in_rank[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
                b_tile = b_slot + r[:, None] * stride_b_rank + n[None, :]
                bs = tl.load(b_tile, mask=in_rank[:, None] & in_cols[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
                if DOT_FP32:
                    delta += tl.dot(hs.to(tl.float32), bs.to(tl.float32), input_precision="ieee")
                else:
                    delta += tl.dot(hs, bs)
            if HAS_BIAS:
                scale = tl.load(scales + row, mask=in_rows, other=0.0)
                lora_bias = tl.load(bias + _slot_offset(slot, stride_bias) + n, mask=in_cols, other=0.0).to(tl.float32)
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
