"""The batched-gather LoRA op and the plain reference it is tested against."""
from __future__ import annotations

import torch

from .batch import LoraBatch


def add_lora(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             batch: LoraBatch) -> torch.Tensor:
    """Add each token's own adapter delta to the base output, in place.

    Semantics:
        for t in range(N):
            s = slot of token t (skip if base)
            y[t] += (x[t] @ lora_a[s].T) @ lora_b[s]

    lora_a is [S, R, in] and lora_b is [S, R, out], zero past each slot's rank, scale already in B.
    Cost is two bmm's over [k, L] grouped rows: it grows with the distinct adapters in the step
    and the largest group, never with tokens x slots, and no per-token copy of A or B is made.
    """
    k, group_len, rank = batch.num_groups, batch.group_len, batch.rank
    x2 = x.reshape(-1, x.shape[-1])  # [N, in]
    y2 = y.view(-1, y.shape[-1])  # [N, out]
    if batch.slots_are_prefix:
        a, b = lora_a[:k, :rank], lora_b[:k, :rank]  # views: no copy
    else:
        a, b = lora_a[batch.slots, :rank], lora_b[batch.slots, :rank]  # [k, r, in], [k, r, out]
    xg = x2.index_select(0, batch.rows).view(k, group_len, -1)  # [k, L, in]
    h = torch.bmm(xg, a.transpose(1, 2))  # [k, L, r]
    if batch.pad_mask is not None:
        h.mul_(batch.pad_mask)
    y2.index_add_(0, batch.rows, torch.bmm(h, b).view(k * group_len, -1))
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
