"""LoraLinear: a base Linear or Conv1D with per-slot LoRA buffers and an optional merged weight."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch import LoraBatch
from .errors import InvalidAdapterError
from .ops import SlotExtras, add_lora
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
        self.is_head = False  # the output head sees only the rows the step keeps (LoraBatch.head)
        self.weight, self.bias = base.weight, base.bias
        shape = tuple(base.weight.shape)
        self.in_features, self.out_features = shape if self.is_conv1d else shape[::-1]
        self.state, self.num_slots, self.max_rank = state, num_slots, max_rank
        self.lora_a: torch.Tensor | None = None  # [S, R, in], allocated on first use
        self.lora_b: torch.Tensor | None = None  # [S, R, out], scale folded in
        self.slot_ranks = [0] * num_slots
        self.extras: SlotExtras | None = None  # lora biases and DoRA scales, once a slot has one
        self.merged_weight: torch.Tensor | None = None  # W0 + delta while merged, else None
        self.merged_bias: torch.Tensor | None = None  # bias + the adapter's, while merged with one
        self._merge_buffer: torch.Tensor | None = None
        self.packed_weight = pack(self.weight) if pack_weights and not self.is_conv1d else None
        self._packed_merged: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.merged_weight is None else self.merged_weight
        packed = self.packed_weight if self.merged_weight is None else self._packed_merged
        bias = self.bias if self.merged_bias is None else self.merged_bias
        if packed is not None:
            y = packed_linear(x, packed, bias)
        elif self.is_conv1d:
            y = torch.addmm(bias, x.reshape(-1, self.in_features), weight)
            y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, weight, bias)
        batch = self.state.batch
        if batch is None or self.lora_a is None:
            return y
        if self.is_head:
            batch = batch.head_batch
        return add_lora(y, x, self.lora_a, self.lora_b, self.slot_ranks, batch, self.extras)

    @torch.no_grad()
    def set_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """Copy an adapter's A and B into `slot` (zero-padded to max rank), or clear it (None)."""
        if weights is None:
            if self.lora_a is not None:
                self.lora_a[slot].zero_()
                self.lora_b[slot].zero_()
            self.slot_ranks[slot] = 0
            self._set_extras(slot, None, None)
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
        self._set_extras(slot, weights.bias, self._dora_scale(weights))

    def _dora_scale(self, weights: LoraWeights) -> torch.Tensor | None:
        """DoRA's g = m / ‖W0 + B·A‖ per output feature (PEFT's column norm), computed once per load."""
        if weights.magnitude is None:
            return None
        w0 = self.weight.float()
        a, b = weights.a.float(), weights.b.float()  # [r, in], [r, out]
        if self.is_conv1d:
            norm = torch.linalg.vector_norm(torch.addmm(w0, a.T, b), dim=0)  # [in, out] -> [out]
        else:
            norm = torch.linalg.vector_norm(torch.addmm(w0, b.T, a), dim=1)  # [out, in] -> [out]
        return (weights.magnitude.float() / norm).to(self.weight.dtype)

    def _set_extras(self, slot: int, bias: torch.Tensor | None, dora_scale: torch.Tensor | None) -> None:
        if self.extras is None:
            if bias is None and dora_scale is None:
                return
            self.extras = SlotExtras(has_bias=[False] * self.num_slots, is_dora=[False] * self.num_slots)
        extras, factory = self.extras, dict(dtype=self.weight.dtype, device=self.weight.device)
        extras.has_bias[slot], extras.is_dora[slot] = bias is not None, dora_scale is not None
        if bias is not None:
            if extras.bias is None:
                extras.bias = torch.zeros(self.num_slots, self.out_features, **factory)
            extras.bias[slot].copy_(bias)
        if dora_scale is not None:
            if extras.dora_scale is None:
                extras.dora_scale = torch.ones(self.num_slots, self.out_features, **factory)
                extras.dora_shift = torch.zeros(self.num_slots, self.out_features, **factory)
            extras.dora_scale[slot].copy_(dora_scale)
            extras.dora_shift[slot].copy_((1 - dora_scale) * self.bias if self.bias is not None else 0 * dora_scale)

    @torch.no_grad()
    def merge(self, terms: list[tuple[int, float]]) -> None:
        """Use W0 + Σ scale·delta(slot) as the weight (DoRA: g ⊙ (W0 + delta), never composed);
        slots that do not target this layer add nothing, and none at all means W0."""
        terms = [(slot, scale) for slot, scale in terms if self.slot_ranks[slot]]
        if not terms:
            self.merged_weight = self.merged_bias = None
            return
        if self._merge_buffer is None:
            self._merge_buffer = torch.empty_like(self.weight)
        source = self.weight  # the first term reads W0, the others add to the buffer in place
        for slot, scale in terms:
            rank = self.slot_ranks[slot]
            a, b = self.lora_a[slot, :rank], self.lora_b[slot, :rank]  # [r, in], [r, out]
            if self.is_conv1d:
                torch.addmm(source, a.T, b, alpha=scale, out=self._merge_buffer)  # [in, out]
            else:
                torch.addmm(source, b.T, a, alpha=scale, out=self._merge_buffer)  # [out, in]
            source = self._merge_buffer
        self.merged_bias = self._merged_extras(terms)
        # Adapters are checked finite at load; only fp16's small range can overflow in the sum,
        # and re-reading every merged weight would cost as much as the merge itself.
        if self.weight.dtype == torch.float16 and not torch.isfinite(self._merge_buffer).all():
            self.merged_weight = None
            raise InvalidAdapterError("merging would overflow this dtype (non-finite weights)")
        self._packed_merged = pack(self._merge_buffer) if self.packed_weight is not None else None
        self.merged_weight = self._merge_buffer

    def _merged_extras(self, terms: list[tuple[int, float]]) -> torch.Tensor | None:
        """Scale the merged weight by DoRA's g, and return the merged bias (None: the base's)."""
        extras = self.extras
        if extras is None:
            return None
        slot = terms[0][0]
        if extras.is_dora[slot]:
            assert len(terms) == 1, "DoRA adapters are never composed"
            g = extras.dora_scale[slot]
            self._merge_buffer.mul_(g[None, :] if self.is_conv1d else g[:, None])
        with_bias = [(slot, scale) for slot, scale in terms if extras.has_bias[slot]]
        if not with_bias:
            return None
        bias = torch.zeros(self.out_features, dtype=self.weight.dtype, device=self.weight.device)
        for slot, scale in with_bias:
            bias.add_(extras.bias[slot], alpha=scale)
        return bias if self.bias is None else bias.add_(self.bias)

    def unmerge(self) -> None:
        self.merged_weight = self._packed_merged = self.merged_bias = None

    def extra_repr(self) -> str:
        kind = "conv1d" if self.is_conv1d else "linear"
        return f"{kind}, in={self.in_features}, out={self.out_features}, slots={self.num_slots}, max_rank={self.max_rank}"
