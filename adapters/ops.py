"""The batched-gather LoRA op and the plain reference it is tested against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .batch import LoraBatch

if TYPE_CHECKING:
    from .lora_kernels import LoraRows


@dataclass
class SlotExtras:
    """A layer's per-slot terms beyond B·A, allocated only once an adapter with them is loaded.

    bias: lora_B's bias (lora_bias), scale folded in; zero for slots without one.
    dora_scale, dora_shift: DoRA's g = m / ‖W0 + B·A‖_c per output feature and (1 - g)·bias, so that
    g ⊙ (W0·x + Δ) + bias = g ⊙ y + shift where y = W0·x + bias + Δ: one multiply-add per row.
    """

    bias: torch.Tensor | None = None  # [S, out]
    dora_scale: torch.Tensor | None = None  # [S + 1, out]: the last row is the identity (base rows)
    dora_shift: torch.Tensor | None = None  # [S + 1, out]
    has_bias: list[bool] | None = None  # per slot
    is_dora: list[bool] | None = None  # per slot

    def apply_run(self, y: torch.Tensor, slot: int, scale: float) -> None:
        """The extras of `slot` on rows `y` [n, out] that already hold their B·A delta."""
        if self.has_bias[slot]:
            y.add_(self.bias[slot], alpha=scale)
        if self.is_dora[slot]:
            y.mul_(self.dora_scale[slot]).add_(self.dora_shift[slot])


def add_lora(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: list[int],
    batch: LoraBatch,
    extras: SlotExtras | None = None,
) -> torch.Tensor:
    """Add each token's own adapter delta to the base output, in place.

    Semantics:
        for t in range(N):
            for (s, c) in the terms of token t (one (slot, 1.0) unless composed; none if base)
                y[t] += c * ((x[t] @ lora_a[s].T) @ lora_b[s] + bias[s])
                if s is DoRA: y[t] = dora_scale[s] * y[t] + dora_shift[s]

    lora_a is [S, R, in] and lora_b is [S, R, out], zero past each slot's rank, scale already in B;
    slot_ranks[s] is that rank for this layer (0: the adapter does not target it, no work).
    Runs cost two matmuls each at their own rank; the grouped rows cost two bmm's over [k, L]
    at the largest rank among them: it grows with the distinct adapters in the step and the
    largest group, never with tokens x slots, and no per-token copy of A or B is made.
    DoRA rows are always runs (LoraBatch.build's direct_slots) and never composed.
    """
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    y2 = y.view(-1, y.shape[-1])  # [N, out]
    for run in batch.runs:
        rank = slot_ranks[run.slot]
        if rank:
            h = x2[run.start : run.stop] @ lora_a[run.slot, :rank].T  # [n, r]
            y2[run.start : run.stop].addmm_(h, lora_b[run.slot, :rank], alpha=run.scale)
            if extras is not None:
                extras.apply_run(y2[run.start : run.stop], run.slot, run.scale)
    groups = batch.groups
    rank = max((slot_ranks[s] for s in groups.slot_list), default=0) if groups else 0
    if rank == 0:
        return y
    k = groups.num_groups
    if groups.slots_are_prefix:
        a, b = lora_a[:k, :rank], lora_b[:k, :rank]  # views: no copy
    else:
        a, b = lora_a[groups.slots, :rank], lora_b[groups.slots, :rank]  # [k, r, in], [k, r, out]
    xg = x2.index_select(0, groups.rows).view(k, groups.group_len, -1)  # [k, L, in]
    h = torch.bmm(xg, a.transpose(1, 2))  # [k, L, r]
    if groups.pad_mask is not None:
        h.mul_(groups.pad_mask)  # padding to 0, composed rows to their scale
    delta = torch.bmm(h, b)  # [k, L, out]
    if extras is not None:
        assert not any(extras.is_dora[s] for s in groups.slot_list), "DoRA rows must run directly"
    if extras is not None and extras.bias is not None:
        bias = extras.bias[groups.slots].unsqueeze(1)  # [k, 1, out]
        delta.add_(bias if groups.pad_mask is None else bias * groups.pad_mask)
    y2.index_add_(0, groups.rows, delta.view(k * groups.group_len, -1))
    return y


def add_lora_stacked(
    y: torch.Tensor, x: torch.Tensor, a_stack_t: torch.Tensor, b_stack: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """`add_lora` for a step's runs in three ops whatever their number: the slots' A stacked and
    transposed [in, Σr] and B stacked [Σr, out] (LoraLinear.stacked), h = x·A_stackᵀ [N, Σr] masked to
    each row's own slots' columns at their scales (LoraBatch.stack_mask), y += h·B_stack. Every row
    computes the other slots' columns too, then zeroes them: at decode's few rows the wasted flops
    cost less than the two calls a run takes (measured: 3 runs of 4 rows, ranks 8/16/8, 576 -> 1536,
    38.6 µs stacked against 77.4 by runs on the 2-core AMD EPYC). Aᵀ is kept contiguous: a
    transposed view sent these small GEMMs down a slower path (16 rows, ranks 8/16/4/8: 38-58 µs a
    call against 31-48 µs)."""
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    h = torch.mm(x2, a_stack_t)
    h.mul_(mask)
    return y2.addmm_(h, b_stack).view_as(y)


def add_lora_rows(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    rows: LoraRows,
    extras: SlotExtras | None = None,
    slot_ranks: list[int] | None = None,
    rank_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """`add_lora`'s semantics in a fixed number of launches whatever the adapters in the step: one
    shrink and one expand per term (adapters/lora_kernels.py), then DoRA's g ⊙ y + shift for every
    row as one gather from a table whose last entry (base rows) is the identity. No host sync, so
    it runs inside a captured CUDA graph.

    `slot_ranks` (host) and `rank_table` ([S] int32, the same on the device): each slot's rank in
    this layer. With them a layer that none of the step's slots targets (`rows.slot_list`; any
    loaded slot for a graph, whose slots change on each replay) launches nothing, decided on the
    host, and the kernels walk each slot's own rank; without them every slot counts as full rank."""
    if slot_ranks is not None and not _targets(slot_ranks, rows.slot_list):
        return y
    from .lora_kernels import lora_expand, lora_shrink  # Triton: imported only where rows are used

    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    h = lora_shrink(x2, lora_a, rows, ranks=rank_table)
    lora_expand(y2, h, lora_b, rows, bias=None if extras is None else extras.bias, ranks=rank_table)
    if extras is not None and extras.dora_scale is not None:  # never composed: the first term's slot
        slot = rows.token_slots[0].long()  # a base row's -1 picks the tables' last row, the identity
        y2.mul_(extras.dora_scale[slot]).add_(extras.dora_shift[slot])
    return y


def _targets(slot_ranks: list[int], slot_list: tuple[int, ...] | None) -> bool:
    """Whether any of `slot_list` (None: any slot) has a rank in this layer."""
    return any(slot_ranks) if slot_list is None else any(slot_ranks[slot] for slot in slot_list)


def add_lora_group_rows(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_as: list[torch.Tensor | None],
    lora_bs: list[torch.Tensor | None],
    sizes: list[int],
    rows: LoraRows,
    slot_ranks: list[list[int]] | None = None,
    rank_tables: list[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """`add_lora_rows` for a fused group: y [N, Σ sizes] holds the members' outputs side by side
    (member j's out_features = sizes[j]); its [S, R, in] and [S, R, out_j] buffers are lora_as[j],
    lora_bs[j] (None: no adapter targets it, no work). One shrink and one expand per term for the
    whole group (adapters/lora_group_kernels.py). No extras: members with LoRA biases or DoRA take
    `add_lora_rows` (the caller's choice).

    `slot_ranks[j]` (host) and `rank_tables[j]` (device) are member j's as in `add_lora_rows`: a
    member none of the step's slots targets is left out on the host (no sync), the group launches
    nothing when that leaves none, and the kernels walk each slot's own rank per member."""
    from .lora_group_kernels import group_expand, group_shrink  # Triton: imported only where rows are used

    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    present = [
        j
        for j, a in enumerate(lora_as)
        if a is not None and (slot_ranks is None or _targets(slot_ranks[j], rows.slot_list))
    ]
    if not present:
        return y
    ranks = None if rank_tables is None else [rank_tables[j] for j in present]
    x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
    h = group_shrink(x2, [lora_as[j] for j in present], rows, ranks)
    group_expand(y2, h, [lora_bs[j] for j in present], [starts[j] for j in present], rows, ranks)
    return y


def add_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    token_slots: torch.Tensor,
    token_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Row-by-row loop with the same semantics as `add_lora` (B·A terms; `token_slots` [N] or
    [K, N] with `token_scales` alike); slow, obviously right, for tests."""
    out = y.clone().view(-1, y.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    slots = token_slots.view(-1, rows.shape[0])
    scales = torch.ones(slots.shape) if token_scales is None else token_scales.view(-1, rows.shape[0])
    for term_slots, term_scales in zip(slots.tolist(), scales.tolist()):
        for t, (slot, scale) in enumerate(zip(term_slots, term_scales)):
            if slot >= 0:
                out[t] += scale * ((rows[t] @ lora_a[slot].T) @ lora_b[slot])
    return out.view_as(y)
