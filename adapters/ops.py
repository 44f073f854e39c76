"""The batched-gather LoRA op and the plain reference it is tested against."""
from __future__ import annotations

import torch

from .batch import LoraBatch


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             slot_ranks: list[int], batch: LoraBatch) -> torch.Tensor:
    """Add each token's own adapter delta to the base output, in place.

    Semantics:
        for t in range(N):
            s = slot of token t (skip if base)
            y[t] += (x[t] @ lora_a[s].T) @ lora_b[s]

    lora_a is [S, R, in] and lora_b is [S, R, out], zero past each slot's rank, scale already in B;
    slot_ranks[s] is that rank for this layer (0: the adapter does not target it, no work).
    Runs cost two matmuls each at their own rank; the grouped rows cost two bmm's over [k, L]
    at the largest rank among them: it grows with the distinct adapters in the step and the
    largest group, never with tokens x slots, and no per-token copy of A or B is made.
    """
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    y2 = y.view(-1, y.shape[-1])  # [N, out]
    for run in batch.runs:
        rank = slot_ranks[run.slot]
        if rank:
            h = x2[run.start:run.stop] @ lora_a[run.slot, :rank].T  # [n, r]
            y2[run.start:run.stop].addmm_(h, lora_b[run.slot, :rank])
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
        h.mul_(groups.pad_mask)
    y2.index_add_(0, groups.rows, torch.bmm(h, b).view(k * groups.group_len, -1))
    return y


def add_lora_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       token_slots: torch.Tensor) -> torch.Tensor:
    """Row-by-row loop with the same semantics as `add_lora`; slow, obviously right, for tests."""
    out = y.clone().view(-1, y.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            out[t] += (rows[t] @ lora_a[slot].T) @ lora_b[slot]
    return out.view_as(y)
