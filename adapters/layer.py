"""LoraLinear: a base Linear or Conv1D with per-slot LoRA buffers and an optional merged weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch import LoraBatch
from .errors import InvalidAdapterError
from .ops import add_lora
from .packed import pack, packed_linear
from .peft_format import LoraWeights


class LoraState:
    """Shared by every LoRA layer of one model: the step's gather batch, or None for no gather."""

    def __init__(self):
        self.batch: LoraBatch | None = None


class LoraLinear(nn.Module):
    """Computes x @ W + each row's own LoRA delta (gather mode) or x @ (W0 + delta) (merged mode).

    W0 (`weight`) is never written: merging fills a separate buffer, so going back to base is a
    pointer change and after any number of swaps W0 is bit-identical to what was loaded.
    With `pack_weights` (nn.Linear on CPU in fp32), forwards run on a oneDNN-packed copy of W0,
    and a merge packs its merged weight too (see packed.py).
    """

    def __init__(self, base: nn.Linear | Conv1D, state: LoraState, num_slots: int, max_rank: int,
                 pack_weights: bool = False):
        super().__init__()
        self.is_conv1d = isinstance(base, Conv1D)  # GPT-2 layout: weight is [in, out]
        self.weight, self.bias = base.weight, base.bias
        shape = tuple(base.weight.shape)
        self.in_features, self.out_features = shape if self.is_conv1d else shape[::-1]
        self.state, self.num_slots, self.max_rank = state, num_slots, max_rank
        self.lora_a: torch.Tensor | None = None  # [S, R, in], allocated on first use
        self.lora_b: torch.Tensor | None = None  # [S, R, out], scale folded in
        self.slot_ranks = [0] * num_slots
        self.merged_weight: torch.Tensor | None = None  # W0 + delta while merged, else None
        self._merge_buffer: torch.Tensor | None = None
        self.packed_weight = pack(self.weight) if pack_weights and not self.is_conv1d else None
        self._packed_merged: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.merged_weight is None else self.merged_weight
        packed = self.packed_weight if self.merged_weight is None else self._packed_merged
        if packed is not None:
            y = packed_linear(x, packed, self.bias)
        elif self.is_conv1d:
            y = torch.addmm(self.bias, x.reshape(-1, self.in_features), weight)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, weight, self.bias)
        batch = self.state.batch
        if batch is None or self.lora_a is None:
            return y
        return add_lora(y, x, self.lora_a, self.lora_b, self.slot_ranks, batch)

    @torch.no_grad()
    def set_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """Copy an adapter's A and B into `slot` (zero-padded to max rank), or clear it (None)."""
        if weights is None:
            if self.lora_a is not None:
                self.lora_a[slot].zero_()
                self.lora_b[slot].zero_()
            self.slot_ranks[slot] = 0
            return
        if self.lora_a is None:
            factory = dict(dtype=self.weight.dtype, device=self.weight.device)
            self.lora_a = torch.zeros(self.num_slots, self.max_rank, self.in_features, **factory)
            self.lora_b = torch.zeros(self.num_slots, self.max_rank, self.out_features, **factory)
        rank = weights.a.shape[0]
        self.lora_a[slot, :rank].copy_(weights.a)
        self.lora_a[slot, rank:].zero_()
        self.lora_b[slot, :rank].copy_(weights.b)
        self.lora_b[slot, rank:].zero_()
        self.slot_ranks[slot] = rank

    @torch.no_grad()
    def merge(self, slot: int) -> None:
        """Use W0 + delta(slot) as the weight; a slot that does not target this layer means W0."""
        rank = self.slot_ranks[slot]
        if rank == 0:
            self.merged_weight = None
            return
        if self._merge_buffer is None:
            self._merge_buffer = torch.empty_like(self.weight)
        a, b = self.lora_a[slot, :rank], self.lora_b[slot, :rank]  # [r, in], [r, out]
        if self.is_conv1d:
            torch.addmm(self.weight, a.T, b, out=self._merge_buffer)  # [in, out]
        else:
            torch.addmm(self.weight, b.T, a, out=self._merge_buffer)  # [out, in]
        # Adapters are checked finite at load; only fp16's small range can overflow in the sum,
        # and re-reading every merged weight would cost as much as the merge itself.
        if self.weight.dtype == torch.float16 and not torch.isfinite(self._merge_buffer).all():
            self.merged_weight = None
            raise InvalidAdapterError("merging would overflow this dtype (non-finite weights)")
        self._packed_merged = pack(self._merge_buffer) if self.packed_weight is not None else None
        self.merged_weight = self._merge_buffer

    def unmerge(self) -> None:
        self.merged_weight = self._packed_merged = None

    def extra_repr(self) -> str:
        kind = "conv1d" if self.is_conv1d else "linear"
        return f"{kind}, in={self.in_features}, out={self.out_features}, slots={self.num_slots}, max_rank={self.max_rank}"
