"""LoRA for a fused group of linears (q/k/v, gate/up) in one shrink and one expand per term.

The members of a group read the same x and write side by side into one fused output y [N, Σ out]
(the CUDA pass's one base GEMM per group). lora_kernels.py would run two launches per member; here
the shrink reads each block of x once for every member's A and writes h [K, N, G·R] (member j's
ranks at columns j·R), and the expand's column blocks walk the members' outputs in turn, each
with its own B and its own R columns of h. Rows are sorted by slot and cut into blocks of one
slot as there (LoraRows), so a program's A or B tiles are one slot's, read in place from each
member's slot buffer; the grids are sized by the rows and each program loops over the blocks the
step uses (as lora_kernels.py), never by the slots. Not yet: each slot's own rank (the buffer's R
is walked), split-K in the shrink, and skipping layers no step slot targets.

Up to three members (q/k/v); members no loaded adapter targets (no buffers) are left out by the
caller (adapters/ops.py), so their columns of y get nothing.
"""

from __future__ import annotations

import torch

from .lora_kernels import BLOCK_M, HAVE_TRITON, LoraRows

if HAVE_TRITON:
    import triton
    import triton.language as tl

MAX_MEMBERS = 3
BLOCK_N = 64  # output columns per expand program
INTERPRETED = False  # set below from what triton.jit made of the kernels


def group_shrink(x: torch.Tensor, lora_as: list[torch.Tensor], rows: LoraRows) -> torch.Tensor:
    """h [K, N, G·R] in x.dtype: h[k, t, j·R : (j+1)·R] = scale[k, t]·(x[t] @ A_j[slot]ᵀ), for the rows
    with a slot (other rows are left unwritten: the expand never reads them). x [N, in]; each A_j
    [S, R, in], one shape for all."""
    num_terms, (num_rows, in_features) = rows.num_terms, x.shape
    rank = lora_as[0].shape[1]
    assert all(a.shape == lora_as[0].shape and a.stride() == lora_as[0].stride() for a in lora_as)
    assert x.stride(1) == 1 and lora_as[0].stride(2) == 1, "the kernel steps the input dimension by one"
    h = torch.empty(num_terms, num_rows, len(lora_as) * rank, dtype=x.dtype, device=x.device)
    pointers = lora_as + [lora_as[0]] * (MAX_MEMBERS - len(lora_as))
    _group_shrink_kernel[(rows.row_blocks, num_terms)](
        x, *pointers, h, rows.sorted_rows, rows.slot_starts, rows.token_scales,
        rows.block_slots, rows.block_firsts, rows.blocks_used, rows.row_blocks,
        in_features, rank,
        x.stride(0), lora_as[0].stride(0), lora_as[0].stride(1), h.stride(0), h.stride(1),
        rows.sorted_rows.stride(0), rows.slot_starts.stride(0), rows.token_scales.stride(0), rows.block_slots.stride(0),
        NUM_MEMBERS=len(lora_as), BLOCK_M=BLOCK_M, BLOCK_R=_tile(rank), BLOCK_K=min(64, _tile(in_features)),
        DOT_FP32=_dot_in_fp32(x.dtype),
    )  # fmt: skip
    return h


def group_expand(
    y: torch.Tensor, h: torch.Tensor, lora_bs: list[torch.Tensor], columns: list[int], rows: LoraRows
) -> torch.Tensor:
    """In place on y [N, Σ out]: y[t, c_j : c_j + out_j] += Σ_k h[k, t, j·R : (j+1)·R] @ B_j[slot],
    c_j = columns[j], each B_j [S, R, out_j]; one launch per term. Returns y."""
    rank = lora_bs[0].shape[1]
    outs = [b.shape[2] for b in lora_bs]
    blocks = [triton.cdiv(out, BLOCK_N) for out in outs]
    padded = MAX_MEMBERS - len(lora_bs)
    b_args = []
    for b, out, column in zip(lora_bs + [lora_bs[0]] * padded, outs + [0] * padded, columns + [0] * padded):
        b_args += [b, out, column, b.stride(0), b.stride(1)]
    num_programs = rows.row_blocks * sum(blocks)  # each loops over the (row block, column block) items used
    for term in range(rows.num_terms):
        _group_expand_kernel[(num_programs,)](
            y, h[term], *b_args, rows.sorted_rows[term], rows.slot_starts[term],
            rows.block_slots[term], rows.block_firsts[term], rows.blocks_used[term : term + 1], num_programs, rank,
            blocks[0], sum(blocks[:2]), sum(blocks), y.stride(0), h.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_tile(rank), DOT_FP32=_dot_in_fp32(y.dtype),
        )  # fmt: skip
    return y


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """As lora_kernels._dot_in_fp32: the interpreter's tl.dot multiplies bf16 tiles as raw bits."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and INTERPRETED)


def _tile(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


if HAVE_TRITON:

    @triton.jit
    def _dot(a, b, DOT_FP32: tl.constexpr):
        if DOT_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _group_shrink_kernel(
        x, a0, a1, a2, h, sorted_rows, slot_starts, scales, block_slots, block_firsts, blocks_used, num_programs,
        in_features, rank,
        stride_x, stride_a_slot, stride_a_rank, stride_h_term, stride_h_row,
        stride_sorted, stride_starts, stride_scales, stride_blocks,
        NUM_MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """Program p of term k takes the blocks p, p + P, ... of the term's used blocks (LoraRows)."""
        term = tl.program_id(1)
        for block in range(tl.program_id(0), tl.load(blocks_used + term), num_programs):
            slot = tl.load(block_slots + term * stride_blocks + block).to(tl.int64)
            first = tl.load(block_firsts + term * stride_blocks + block)
            stop = tl.load(slot_starts + term * stride_starts + slot + 1)
            offsets = first + tl.arange(0, BLOCK_M)
            in_rows = offsets < stop
            row = tl.load(sorted_rows + term * stride_sorted + offsets, mask=in_rows, other=0).to(tl.int64)
            r = tl.arange(0, BLOCK_R)
            acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, in_features, BLOCK_K):
                k = k0 + tl.arange(0, BLOCK_K)
                in_k = k < in_features
                xs = tl.load(x + row[:, None] * stride_x + k[None, :], mask=in_rows[:, None] & in_k[None, :], other=0.0)
                a_offsets = slot * stride_a_slot + k[:, None] + r[None, :] * stride_a_rank  # Aᵀ tile, in place
                a_mask = in_k[:, None] & (r[None, :] < rank)
                acc0 += _dot(xs, tl.load(a0 + a_offsets, mask=a_mask, other=0.0), DOT_FP32)
                if NUM_MEMBERS > 1:
                    acc1 += _dot(xs, tl.load(a1 + a_offsets, mask=a_mask, other=0.0), DOT_FP32)
                if NUM_MEMBERS > 2:
                    acc2 += _dot(xs, tl.load(a2 + a_offsets, mask=a_mask, other=0.0), DOT_FP32)
            scale = tl.load(scales + term * stride_scales + row, mask=in_rows, other=0.0)[:, None]
            out = h + term * stride_h_term + row[:, None] * stride_h_row + r[None, :]
            mask = in_rows[:, None] & (r[None, :] < rank)
            tl.store(out, (acc0 * scale).to(h.dtype.element_ty), mask=mask)
            if NUM_MEMBERS > 1:
                tl.store(out + rank, (acc1 * scale).to(h.dtype.element_ty), mask=mask)
            if NUM_MEMBERS > 2:
                tl.store(out + 2 * rank, (acc2 * scale).to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def _expand_member(
        y, h, b, out_features, column, stride_b_slot, stride_b_rank, slot, row, in_rows, column_block, rank,
        stride_y, stride_h, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        r = tl.arange(0, BLOCK_R)
        n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        in_cols = n < out_features
        hs = tl.load(h + row[:, None] * stride_h + r[None, :], mask=in_rows[:, None] & (r[None, :] < rank), other=0.0)
        bs = tl.load(
            b + slot * stride_b_slot + r[:, None] * stride_b_rank + n[None, :],
            mask=(r[:, None] < rank) & in_cols[None, :],
            other=0.0,
        )  # [BLOCK_R, BLOCK_N]
        delta = _dot(hs, bs, DOT_FP32)
        mask = in_rows[:, None] & in_cols[None, :]
        pointers = y + row[:, None] * stride_y + column + n[None, :]
        before = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
        tl.store(pointers, (before + delta).to(y.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_expand_kernel(
        y, h,
        b0, out0, column0, stride_b0_slot, stride_b0_rank,
        b1, out1, column1, stride_b1_slot, stride_b1_rank,
        b2, out2, column2, stride_b2_slot, stride_b2_rank,
        sorted_rows, slot_starts, block_slots, block_firsts, blocks_used, num_programs, rank,
        blocks_before_1, blocks_before_2, column_blocks, stride_y, stride_h,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """Program p takes the (row block, column block) items p, p + P, ... of the used blocks."""
        num_items = tl.load(blocks_used) * column_blocks
        for item in range(tl.program_id(0), num_items, num_programs):
            block, column_block = item // column_blocks, item % column_blocks
            slot = tl.load(block_slots + block).to(tl.int64)
            first = tl.load(block_firsts + block)
            stop = tl.load(slot_starts + slot + 1)
            offsets = first + tl.arange(0, BLOCK_M)
            in_rows = offsets < stop
            row = tl.load(sorted_rows + offsets, mask=in_rows, other=0).to(tl.int64)
            if column_block < blocks_before_1:
                _expand_member(
                    y, h, b0, out0, column0, stride_b0_slot, stride_b0_rank, slot, row, in_rows,
                    column_block, rank, stride_y, stride_h, BLOCK_N, BLOCK_R, DOT_FP32,
                )  # fmt: skip
            elif column_block < blocks_before_2:
                _expand_member(
                    y, h + rank, b1, out1, column1, stride_b1_slot, stride_b1_rank, slot, row, in_rows,
                    column_block - blocks_before_1, rank, stride_y, stride_h, BLOCK_N, BLOCK_R, DOT_FP32,
                )  # fmt: skip
            else:
                _expand_member(
                    y, h + 2 * rank, b2, out2, column2, stride_b2_slot, stride_b2_rank, slot, row, in_rows,
                    column_block - blocks_before_2, rank, stride_y, stride_h, BLOCK_N, BLOCK_R, DOT_FP32,
                )  # fmt: skip

    # What triton.jit decided (it reads TRITON_INTERPRET, spelled as its version accepts it).
    INTERPRETED = not isinstance(_group_shrink_kernel, triton.JITFunction)
