"""LoRA for a fused group of linears (q/k/v, gate/up) in one shrink and one expand per term.

The members of a group read the same x and write side by side into one fused output y [N, Σ out]
(the CUDA pass's one base GEMM per group). lora_kernels.py would run two launches per member; here
the shrink reads each block of x once for every member's A and writes h [K, N, G·R] (member j's
ranks at columns j·R), and the expand's column blocks walk the members' outputs in turn, each
with its own B and its own R columns of h. Rows are sorted by slot and cut into blocks of one
slot as there (LoraRows), so a program's A or B tiles are one slot's, read in place from each
member's slot buffer; the grids are sized by the rows and each program loops over the blocks the
step uses (as lora_kernels.py), never by the slots. Each member has its own per-layer rank table
(an adapter may target q at rank 8 and v not at all): programs walk each slot's own ranks in chunks
of at most MAX_BLOCK_R (lora_kernels.rank_tile), so a rank-8 adapter in a rank-64 buffer loads 8
rows of each A and B and never the zeros past them. The shrink splits K as lora_kernels.py does
(ShrinkPlan: until one row fills the SMs; the block's last split sums the fp32 partials in split
order, so h needs no zero fill and no atomics).

Up to three members (q/k/v); members no loaded adapter targets (no buffers) are left out by the
caller (adapters/ops.py), so their columns of y get nothing.
"""

from __future__ import annotations

import torch

from .lora_kernels import BLOCK_M, HAVE_TRITON, LoraRows, ShrinkPlan, _full_ranks, rank_tile, target_programs

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .lora_kernels import _block_rows, _slot_offset

MAX_MEMBERS = 3
BLOCK_N = 64  # output columns per expand program
INTERPRETED = False  # set below from what triton.jit made of the kernels


def group_shrink(
    x: torch.Tensor, lora_as: list[torch.Tensor], rows: LoraRows, ranks: list[torch.Tensor | None] | None = None
) -> torch.Tensor:
    """h [K, N, G·R] in x.dtype: h[k, t, j·R : j·R + r_j] = scale[k, t]·(x[t] @ A_j[slot, :r_j]ᵀ), r_j
    the slot's rank in member j (`ranks[j]` [S] int32 on the device; None: the buffer's R), for the
    rows with a slot. Nothing else of h is written: the expand reads only those entries. x [N, in];
    each A_j [S, R, in], one shape for all."""
    num_terms, (num_rows, in_features) = rows.num_terms, x.shape
    rank = lora_as[0].shape[1]
    assert all(a.shape == lora_as[0].shape and a.stride() == lora_as[0].stride() for a in lora_as)
    assert x.stride(1) == 1 and lora_as[0].stride(2) == 1, "the kernel steps the input dimension by one"
    h = torch.empty(num_terms, num_rows, len(lora_as) * rank, dtype=x.dtype, device=x.device)
    pointers = lora_as + [lora_as[0]] * (MAX_MEMBERS - len(lora_as))
    tables = _rank_tables(lora_as, ranks)
    plan = ShrinkPlan.choose(in_features, rows.row_blocks, num_terms, target_programs(x.device))
    split = plan.num_splits > 1
    partials = h  # [splits, K, N, G·R] fp32 when split: each split's sum, added up by the block's last split
    if split:
        partials = torch.empty(plan.num_splits, *h.shape, dtype=torch.float32, device=x.device)
    num_programs = rows.row_blocks * plan.num_splits  # per term; each loops over the (block, split) items used
    _group_shrink_kernel[(num_programs, num_terms)](
        x, *pointers, h, partials, *tables, rows.sorted_rows, rows.slot_starts, rows.token_scales,
        rows.block_slots, rows.block_firsts, rows.blocks_used, rows.split_counts, num_programs,
        in_features, plan.k_per_split, plan.num_splits, rank,
        x.stride(0), lora_as[0].stride(0), lora_as[0].stride(1), h.stride(0), h.stride(1),
        partials.stride(0), partials.stride(1), partials.stride(2),
        rows.sorted_rows.stride(0), rows.slot_starts.stride(0), rows.token_scales.stride(0), rows.block_slots.stride(0),
        NUM_MEMBERS=len(lora_as), BLOCK_M=BLOCK_M, BLOCK_R=rank_tile(rank), BLOCK_K=plan.block_k, SPLIT=split,
        DOT_FP32=_dot_in_fp32(x.dtype),
    )  # fmt: skip
    return h


def group_expand(
    y: torch.Tensor,
    h: torch.Tensor,
    lora_bs: list[torch.Tensor],
    columns: list[int],
    rows: LoraRows,
    ranks: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """In place on y [N, Σ out]: y[t, c_j : c_j + out_j] += Σ_k h[k, t, j·R : j·R + r_j] @ B_j[slot, :r_j],
    c_j = columns[j], each B_j [S, R, out_j], r_j as in `group_shrink`; one launch per term. Returns y."""
    rank = lora_bs[0].shape[1]
    outs = [b.shape[2] for b in lora_bs]
    blocks = [triton.cdiv(out, BLOCK_N) for out in outs]
    padded = MAX_MEMBERS - len(lora_bs)
    b_args = []
    buffers, tables = lora_bs + [lora_bs[0]] * padded, _rank_tables(lora_bs, ranks)
    for b, table, out, column in zip(buffers, tables, outs + [0] * padded, columns + [0] * padded):
        b_args += [b, table, out, column, b.stride(0), b.stride(1)]
    num_programs = rows.row_blocks * sum(blocks)  # each loops over the (row block, column block) items used
    for term in range(rows.num_terms):
        _group_expand_kernel[(num_programs,)](
            y, h[term], *b_args, rows.sorted_rows[term], rows.slot_starts[term],
            rows.block_slots[term], rows.block_firsts[term], rows.blocks_used[term : term + 1], num_programs, rank,
            blocks[0], sum(blocks[:2]), sum(blocks), y.stride(0), h.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=rank_tile(rank), DOT_FP32=_dot_in_fp32(y.dtype),
        )  # fmt: skip
    return y


def _rank_tables(buffers: list[torch.Tensor], ranks: list[torch.Tensor | None] | None) -> list[torch.Tensor]:
    """Each member's [S] int32 rank table (the buffer's R where none is given), padded to MAX_MEMBERS
    with the first's (a padded member's kernel code is compiled out)."""
    ranks = [None] * len(buffers) if ranks is None else ranks
    tables = [_full_ranks(buf, buf.shape[1]) if table is None else table for buf, table in zip(buffers, ranks)]
    return tables + [tables[0]] * (MAX_MEMBERS - len(tables))


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
    def _store_member(h, partials, split, acc, scale, row, in_rows, r, in_rank, stride_h_row, stride_p_split,
                      stride_p_row, SPLIT: tl.constexpr):  # fmt: skip
        """A member's chunk: its fp32 partial when split (scaled once summed), else scaled into h."""
        mask = in_rows[:, None] & in_rank[None, :]
        if SPLIT:
            tl.store(partials + split * stride_p_split + row[:, None] * stride_p_row + r[None, :], acc, mask=mask)
        else:
            tl.store(h + row[:, None] * stride_h_row + r[None, :], (acc * scale).to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def _sum_member(h, partials, num_splits, scale, row, in_rows, r, in_rank, stride_h_row, stride_p_split,
                    stride_p_row, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
        """The splits' partials of a member's chunk summed in split order, scaled into h."""
        mask = in_rows[:, None] & in_rank[None, :]
        p = partials + row[:, None] * stride_p_row + r[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for j in range(0, num_splits):
            acc += tl.load(p + j * stride_p_split, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(h + row[:, None] * stride_h_row + r[None, :], (acc * scale).to(h.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_shrink_kernel(
        x, a0, a1, a2, h, partials, ranks0, ranks1, ranks2, sorted_rows, slot_starts, scales, block_slots,
        block_firsts, blocks_used, split_counts, num_programs,
        in_features, k_per_split, num_splits, member_columns,
        stride_x, stride_a_slot, stride_a_rank, stride_h_term, stride_h_row,
        stride_p_split, stride_p_term, stride_p_row,
        stride_sorted, stride_starts, stride_scales, stride_blocks,
        NUM_MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
        SPLIT: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """Program p of term k takes the (block, split) items p, p + P, ... of the term's used blocks."""
        term = tl.program_id(1)
        sorted_rows += term * stride_sorted
        slot_starts += term * stride_starts
        block_slots += term * stride_blocks
        block_firsts += term * stride_blocks
        split_counts += term * stride_blocks
        scales += term * stride_scales
        h += term * stride_h_term
        partials += term * stride_p_term
        num_items = tl.load(blocks_used + term) * num_splits
        for item in range(tl.program_id(0), num_items, num_programs):
            block, split = item // num_splits, item % num_splits
            slot = tl.load(block_slots + block)
            row, in_rows = _block_rows(sorted_rows, slot_starts, block_firsts, slot, block, BLOCK_M)
            rank0, rank1, rank2 = tl.load(ranks0 + slot), tl.load(ranks1 + slot), tl.load(ranks2 + slot)
            rank = tl.maximum(rank0, tl.maximum(rank1, rank2))
            a_slot = _slot_offset(slot, stride_a_slot)
            k_first = split * k_per_split
            k_stop = tl.minimum(k_first + k_per_split, in_features)
            scale = tl.load(scales + row, mask=in_rows, other=0.0)[:, None]
            # One x tile feeds every member's chunk; a member past its own rank masks its A (no load).
            for r0 in range(0, rank, BLOCK_R):
                r = r0 + tl.arange(0, BLOCK_R)
                in0, in1, in2 = r < rank0, r < rank1, r < rank2
                acc0 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                acc1 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                acc2 = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                for k0 in range(k_first, k_stop, BLOCK_K):
                    k = k0 + tl.arange(0, BLOCK_K)
                    in_k = k < k_stop
                    x_tile = x + row[:, None] * stride_x + k[None, :]
                    xs = tl.load(x_tile, mask=in_rows[:, None] & in_k[None, :], other=0.0)
                    a_offsets = a_slot + k[:, None] + r[None, :] * stride_a_rank  # Aᵀ tile, in place
                    acc0 += _dot(xs, tl.load(a0 + a_offsets, mask=in_k[:, None] & in0[None, :], other=0.0), DOT_FP32)
                    if NUM_MEMBERS > 1:
                        a_t = tl.load(a1 + a_offsets, mask=in_k[:, None] & in1[None, :], other=0.0)
                        acc1 += _dot(xs, a_t, DOT_FP32)
                    if NUM_MEMBERS > 2:
                        a_t = tl.load(a2 + a_offsets, mask=in_k[:, None] & in2[None, :], other=0.0)
                        acc2 += _dot(xs, a_t, DOT_FP32)
                _store_member(
                    h, partials, split, acc0, scale, row, in_rows, r, in0, stride_h_row, stride_p_split, stride_p_row,
                    SPLIT,
                )  # fmt: skip
                if NUM_MEMBERS > 1:
                    _store_member(
                        h + member_columns, partials + member_columns, split, acc1, scale, row, in_rows, r, in1,
                        stride_h_row, stride_p_split, stride_p_row, SPLIT,
                    )  # fmt: skip
                if NUM_MEMBERS > 2:
                    _store_member(
                        h + 2 * member_columns, partials + 2 * member_columns, split, acc2, scale, row, in_rows, r,
                        in2, stride_h_row, stride_p_split, stride_p_row, SPLIT,
                    )  # fmt: skip
            if SPLIT:
                # As lora_kernels._shrink_kernel: the block's last split sums every split's partial
                # in split order and resets the count for the next launch or graph replay.
                tl.debug_barrier()  # every lane's partial stored before the count says so
                if tl.atomic_add(split_counts + block, 1, sem="acq_rel") == num_splits - 1:
                    tl.atomic_xchg(split_counts + block, 0)
                    for r0 in range(0, rank, BLOCK_R):
                        r = r0 + tl.arange(0, BLOCK_R)
                        _sum_member(
                            h, partials, num_splits, scale, row, in_rows, r, r < rank0, stride_h_row,
                            stride_p_split, stride_p_row, BLOCK_M, BLOCK_R,
                        )  # fmt: skip
                        if NUM_MEMBERS > 1:
                            _sum_member(
                                h + member_columns, partials + member_columns, num_splits, scale, row, in_rows, r,
                                r < rank1, stride_h_row, stride_p_split, stride_p_row, BLOCK_M, BLOCK_R,
                            )  # fmt: skip
                        if NUM_MEMBERS > 2:
                            _sum_member(
                                h + 2 * member_columns, partials + 2 * member_columns, num_splits, scale, row,
                                in_rows, r, r < rank2, stride_h_row, stride_p_split, stride_p_row, BLOCK_M, BLOCK_R,
                            )  # fmt: skip

    @triton.jit
    def _expand_member(
        y, h, b, ranks, out_features, column, stride_b_slot, stride_b_rank, slot, row, in_rows, column_block,
        stride_y, stride_h, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        rank = tl.load(ranks + slot)
        b_slot = b + _slot_offset(slot, stride_b_slot)
        n = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
        in_cols = n < out_features
        delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):  # this slot's own rank in this member, never the buffer's
            r = r0 + tl.arange(0, BLOCK_R)
            in_rank = r < rank
            hs = tl.load(h + row[:, None] * stride_h + r[None, :], mask=in_rows[:, None] & in_rank[None, :], other=0.0)
            b_tile = b_slot + r[:, None] * stride_b_rank + n[None, :]
            bs = tl.load(b_tile, mask=in_rank[:, None] & in_cols[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
            delta += _dot(hs, bs, DOT_FP32)
        mask = in_rows[:, None] & in_cols[None, :]
        pointers = y + row[:, None] * stride_y + column + n[None, :]
        before = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
        tl.store(pointers, (before + delta).to(y.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_expand_kernel(
        y, h,
        b0, ranks0, out0, column0, stride_b0_slot, stride_b0_rank,
        b1, ranks1, out1, column1, stride_b1_slot, stride_b1_rank,
        b2, ranks2, out2, column2, stride_b2_slot, stride_b2_rank,
        sorted_rows, slot_starts, block_slots, block_firsts, blocks_used, num_programs, member_columns,
        blocks_before_1, blocks_before_2, column_blocks, stride_y, stride_h,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr,
    ):  # fmt: skip
        """Program p takes the (row block, column block) items p, p + P, ... of the used blocks."""
        num_items = tl.load(blocks_used) * column_blocks
        for item in range(tl.program_id(0), num_items, num_programs):
            block, column_block = item // column_blocks, item % column_blocks
            slot = tl.load(block_slots + block)
            row, in_rows = _block_rows(sorted_rows, slot_starts, block_firsts, slot, block, BLOCK_M)
            if column_block < blocks_before_1:
                _expand_member(
                    y, h, b0, ranks0, out0, column0, stride_b0_slot, stride_b0_rank, slot, row, in_rows,
                    column_block, stride_y, stride_h, BLOCK_M, BLOCK_N, BLOCK_R, DOT_FP32,
                )  # fmt: skip
            elif column_block < blocks_before_2:
                _expand_member(
                    y, h + member_columns, b1, ranks1, out1, column1, stride_b1_slot, stride_b1_rank, slot, row,
                    in_rows, column_block - blocks_before_1, stride_y, stride_h, BLOCK_M, BLOCK_N, BLOCK_R, DOT_FP32,
                )  # fmt: skip
            else:
                _expand_member(
                    y, h + 2 * member_columns, b2, ranks2, out2, column2, stride_b2_slot, stride_b2_rank, slot, row,
                    in_rows, column_block - blocks_before_2, stride_y, stride_h, BLOCK_M, BLOCK_N, BLOCK_R, DOT_FP32,
                )  # fmt: skip

    # What triton.jit decided (it reads TRITON_INTERPRET, spelled as its version accepts it).
    INTERPRETED = not isinstance(_group_shrink_kernel, triton.JITFunction)
