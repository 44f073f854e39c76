"""LoraEmbedding: the input embedding with per-slot LoRA rows (PEFT's lora_embedding_A/B)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch import LoraBatch
from .slots import LoraSlots, LoraState


class LoraEmbedding(LoraSlots):
    """Looks up W0[id] plus each row's own delta A[:, id]·B (gather) or (W0 + Aᵀ·B)[id] (merged).

    PEFT's delta for token id t is `s · B · A[:, t]`: a row of Aᵀ times B, so A is kept transposed,
    `[S, vocab, R]`, and a row's A is one contiguous lookup. Slots, merge and unmerge as LoraSlots
    (`in_features` = vocab, `out_features` = hidden), so the registry and merges treat it and
    LoraLinear alike; W0 is never written.
    """

    is_a_transposed = True
    weight_is_in_out = True  # the table is [vocab, hidden]
    is_conv1d = False
    packed_weight = None
    quantized = None  # the table is never quantized: a lookup reads one row per token
    extras = None  # DoRA and LoRA biases on an embedding are refused at parse

    def __init__(self, base: nn.Embedding, state: LoraState, num_slots: int, max_rank: int):
        super().__init__(state, num_slots, max_rank, *base.weight.shape, base.weight)
        self.weight = base.weight  # [vocab, hidden], shared with a tied head
        self.padding_idx = base.padding_idx
        self.num_embeddings, self.embedding_dim = base.weight.shape  # nn.Embedding's names, read by transformers

    def _base_forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.merged_weight is None else self.merged_weight
        return F.embedding(ids, weight, self.padding_idx)

    def add_delta(self, y: torch.Tensor, ids: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        return add_embedding_lora(y, ids, self.lora_a, self.lora_b, self.slot_ranks, batch)

    def base_weight(self) -> torch.Tensor:
        """W0 ([vocab, hidden]), as LoraLinear.base_weight: the table is never quantized."""
        return self.weight

    def extra_repr(self) -> str:
        return f"embedding, vocab={self.in_features}, hidden={self.out_features}, slots={self.num_slots}"


def add_embedding_lora(
    y: torch.Tensor,
    ids: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot_ranks: list[int],
    batch: LoraBatch,
) -> torch.Tensor:
    """Add each token's own embedding delta to the looked-up rows, in place.

    Semantics:
        for t in range(N):
            for (s, c) in the terms of token t:
                y[t] += c * lora_a[s, ids[t]] @ lora_b[s]

    The same runs and groups as `add_lora`, with a row lookup in place of x @ Aᵀ.
    """
    ids = ids.reshape(-1)  # [N]
    y2 = y.view(-1, y.shape[-1])  # [N, hidden]
    for run in batch.runs:
        rank = slot_ranks[run.slot]
        if rank:
            h = lora_a[run.slot].index_select(0, ids[run.start : run.stop])[:, :rank]  # [n, r]
            y2[run.start : run.stop].addmm_(h, lora_b[run.slot, :rank], alpha=run.scale)
    groups = batch.groups
    rank = max((slot_ranks[s] for s in groups.slot_list), default=0) if groups else 0
    if rank == 0:
        return y
    k = groups.num_groups
    token_ids = ids.index_select(0, groups.rows).view(k, groups.group_len)  # [k, L]
    h = lora_a[groups.slots[:, None], token_ids][..., :rank]  # [k, L, r]
    if groups.pad_mask is not None:
        h = h * groups.pad_mask
    delta = torch.bmm(h, lora_b[groups.slots, :rank])  # [k, L, hidden]
    y2.index_add_(0, groups.rows, delta.view(k * groups.group_len, -1))
    return y
