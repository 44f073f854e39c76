"""LoraEmbedding: the input embedding with per-slot LoRA rows (PEFT's lora_embedding_A/B)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .batch import LoraBatch
from .errors import InvalidAdapterError
from .peft_format import LoraWeights


class LoraEmbedding(nn.Module):
    """Looks up W0[id] plus each row's own delta A[:, id]·B (gather) or (W0 + Aᵀ·B)[id] (merged).

    PEFT's delta for token id t is `s · B · A[:, t]`: a row of Aᵀ times B, so A is kept transposed,
    `[S, vocab, R]`, and a row's A is one contiguous lookup. Same slot interface as LoraLinear
    (`in_features` = vocab, `out_features` = hidden), so the registry and merges treat both alike.
    W0 is never written: a merge fills a separate table.
    """

    is_conv1d = False
    packed_weight = None
    int8 = None  # the table is never quantized: a lookup reads one row per token
    extras = None  # DoRA and LoRA biases on an embedding are refused at parse

    def __init__(self, base: nn.Embedding, state, num_slots: int, max_rank: int):
        super().__init__()
        self.weight = base.weight  # [vocab, hidden], shared with a tied head
        self.padding_idx = base.padding_idx
        self.in_features, self.out_features = base.weight.shape
        self.num_embeddings, self.embedding_dim = base.weight.shape  # nn.Embedding's names, read by transformers
        self.state, self.num_slots, self.max_rank = state, num_slots, max_rank
        self.lora_a: torch.Tensor | None = None  # [S, vocab, R], allocated on first use
        self.lora_b: torch.Tensor | None = None  # [S, R, hidden], scale folded in
        self.slot_ranks = [0] * num_slots
        self.merged_weight: torch.Tensor | None = None
        self._merge_buffer: torch.Tensor | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.merged_weight is None else self.merged_weight
        y = F.embedding(ids, weight, self.padding_idx)
        batch = self.state.batch
        if batch is None or self.lora_a is None:
            return y
        return add_embedding_lora(y, ids, self.lora_a, self.lora_b, self.slot_ranks, batch)

    @torch.no_grad()
    def set_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """Copy an adapter's A ([r, vocab]) and B ([r, hidden]) into `slot`, or clear it (None)."""
        if weights is None:
            if self.lora_a is not None:
                self.lora_a[slot].zero_()
                self.lora_b[slot].zero_()
            self.slot_ranks[slot] = 0
            return
        if self.lora_a is None:
            factory = dict(dtype=self.weight.dtype, device=self.weight.device)
            self.lora_a = torch.zeros(self.num_slots, self.in_features, self.max_rank, **factory)
            self.lora_b = torch.zeros(self.num_slots, self.max_rank, self.out_features, **factory)
        rank = weights.a.shape[0]
        self.lora_a[slot].zero_()
        self.lora_a[slot, :, :rank].copy_(weights.a.T)
        self.lora_b[slot].zero_()
        self.lora_b[slot, :rank].copy_(weights.b)
        self.slot_ranks[slot] = rank

    @torch.no_grad()
    def merge(self, terms: list[tuple[int, float]]) -> None:
        """Use W0 + Σ scale·Aᵀ·B as the table; slots that do not target it add nothing."""
        terms = [(slot, scale) for slot, scale in terms if self.slot_ranks[slot]]
        if not terms:
            self.merged_weight = None
            return
        if self._merge_buffer is None:
            self._merge_buffer = torch.empty_like(self.weight)
        source = self.weight
        for slot, scale in terms:
            rank = self.slot_ranks[slot]
            torch.addmm(source, self.lora_a[slot, :, :rank], self.lora_b[slot, :rank], alpha=scale,
                        out=self._merge_buffer)  # [vocab, hidden]
            source = self._merge_buffer
        if self.weight.dtype == torch.float16 and not torch.isfinite(self._merge_buffer).all():
            raise InvalidAdapterError("merging would overflow this dtype (non-finite weights)")
        self.merged_weight = self._merge_buffer

    def unmerge(self) -> None:
        self.merged_weight = None

    def base_weight(self) -> torch.Tensor:
        """W0 ([vocab, hidden]), as LoraLinear.base_weight: the table is never quantized."""
        return self.weight

    def extra_repr(self) -> str:
        return f"embedding, vocab={self.in_features}, hidden={self.out_features}, slots={self.num_slots}"


def add_embedding_lora(y: torch.Tensor, ids: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                       slot_ranks: list[int], batch: LoraBatch) -> torch.Tensor:
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
            h = lora_a[run.slot].index_select(0, ids[run.start:run.stop])[:, :rank]  # [n, r]
            y2[run.start:run.stop].addmm_(h, lora_b[run.slot, :rank], alpha=run.scale)
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
