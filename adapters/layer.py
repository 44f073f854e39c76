"""LoraLinear: a base Linear or Conv1D with per-slot LoRA buffers and an optional merged weight."""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch import LoraBatch
from .errors import InvalidAdapterError
from .int8 import Int8Weight
from .kernels import PLAIN, Conv1dLinear, KernelRule, dense_kernel, int8_kernel
from .ops import SlotExtras, add_lora
from .peft_format import LoraWeights


class LoraState:
    """Shared by every LoRA layer of one model: the step's gather batch, or None for no gather."""

    def __init__(self):
        self.batch: LoraBatch | None = None


class LoraLinear(nn.Module):
    """Computes x @ W + each row's own LoRA delta (gather mode) or x @ (W0 + delta) (merged mode).

    W0 (`weight`) is never written: merging fills a separate buffer, so going back to base is a
    pointer change and after any number of swaps W0 is bit-identical to what was loaded.
    The base matmul is a kernel picked per weight (kernels.py): MKL, oneDNN-packed (`use_kernels`),
    or int8 (`quantize_int8`), which drops the full-precision W0: `base_weight()` dequantizes it for
    the few readers of its values (merges, DoRA norms, per-row copies).
    """

    def __init__(self, base: nn.Linear | Conv1D, state: LoraState, num_slots: int, max_rank: int):
        super().__init__()
        self.is_conv1d = isinstance(base, Conv1D)  # GPT-2 layout: weight is [in, out]
        self.is_head = False  # the output head sees only the rows the step keeps (LoraBatch.head)
        self.weight, self.bias = base.weight, base.bias
        self.weight_shape = tuple(base.weight.shape)
        self.dtype, self.device = base.weight.dtype, base.weight.device
        self.in_features, self.out_features = self.weight_shape if self.is_conv1d else self.weight_shape[::-1]
        self.state, self.num_slots, self.max_rank = state, num_slots, max_rank
        self.lora_a: torch.Tensor | None = None  # [S, R, in], allocated on first use
        self.lora_b: torch.Tensor | None = None  # [S, R, out], scale folded in
        self.slot_ranks = [0] * num_slots
        self.extras: SlotExtras | None = None  # lora biases and DoRA scales, once a slot has one
        self.int8: Int8Weight | None = None  # W0 as int8, once quantized
        self.dense_rule = KernelRule.single(PLAIN)  # kernels for full-precision weights: W0, merged weights
        self.kernel = self._dense_kernel(self.weight, self.bias)  # x -> x @ W0 + bias
        self.merged_kernel = None  # x -> x @ (W0 + delta) + bias, while merged
        self.merged_weight: torch.Tensor | None = None  # W0 + delta while merged, else None
        self.merged_bias: torch.Tensor | None = None  # bias + the adapter's, while merged with one
        self._merge_buffer: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.kernel if self.merged_kernel is None else self.merged_kernel)(x)
        batch = self.state.batch
        if batch is None or self.lora_a is None:
            return y
        if self.is_head:
            batch = batch.head_batch
        return add_lora(y, x, self.lora_a, self.lora_b, self.slot_ranks, batch, self.extras)

    def use_kernels(self, dense: KernelRule) -> None:
        """Run full-precision weights (W0 unless quantized, and merged weights) by `dense`."""
        self.dense_rule = dense
        if self.int8 is None:
            self.kernel = self._dense_kernel(self.weight, self.bias)

    def quantize_int8(self, rule: KernelRule, scratch: torch.Tensor | None, keep_weight: bool = False) -> None:
        """Run W0 as int8 by `rule`, and drop its full-precision copy unless `keep_weight` (the head:
        its W0 is compared with saved copies, and tied to the embedding it stays resident anyway)."""
        assert not self.is_conv1d and self.merged_kernel is None
        self.int8 = Int8Weight.quantize(self.weight)
        self.kernel = int8_kernel(rule, self.int8, self.bias, self.dtype, scratch)
        if not keep_weight:
            del self.weight

    def base_weight(self) -> torch.Tensor:
        """W0 in the model's dtype and this layer's layout, as the base matmul uses it: dequantized
        into a new tensor if int8 (off the hot path)."""
        return self.weight if self.int8 is None else self.int8.dequantize(self.dtype)

    @property
    def packed_weight(self) -> torch.Tensor | None:
        """The oneDNN-packed W0 the base matmul uses (for some row counts at least), if any."""
        return self.kernel.packed

    def _dense_kernel(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return Conv1dLinear(weight, bias) if self.is_conv1d else dense_kernel(self.dense_rule, weight, bias)

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
            factory = dict(dtype=self.dtype, device=self.device)
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
        w0 = self.base_weight().float()
        a, b = weights.a.float(), weights.b.float()  # [r, in], [r, out]
        if self.is_conv1d:
            norm = torch.linalg.vector_norm(torch.addmm(w0, a.T, b), dim=0)  # [in, out] -> [out]
        else:
            norm = torch.linalg.vector_norm(torch.addmm(w0, b.T, a), dim=1)  # [out, in] -> [out]
        return (weights.magnitude.float() / norm).to(self.dtype)

    def _set_extras(self, slot: int, bias: torch.Tensor | None, dora_scale: torch.Tensor | None) -> None:
        if self.extras is None:
            if bias is None and dora_scale is None:
                return
            self.extras = SlotExtras(has_bias=[False] * self.num_slots, is_dora=[False] * self.num_slots)
        extras, factory = self.extras, dict(dtype=self.dtype, device=self.device)
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
            self.unmerge()
            return
        if self._merge_buffer is None:
            self._merge_buffer = torch.empty(self.weight_shape, dtype=self.dtype, device=self.device)
        # The first term reads W0 (int8: dequantized into the buffer), the others add to the buffer in place.
        source = self.weight if self.int8 is None else self.int8.dequantize(self.dtype, out=self._merge_buffer)
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
        if self.dtype == torch.float16 and not torch.isfinite(self._merge_buffer).all():
            self.unmerge()
            raise InvalidAdapterError("merging would overflow this dtype (non-finite weights)")
        bias = self.bias if self.merged_bias is None else self.merged_bias
        self.merged_kernel = self._dense_kernel(self._merge_buffer, bias)
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
        bias = torch.zeros(self.out_features, dtype=self.dtype, device=self.device)
        for slot, scale in with_bias:
            bias.add_(extras.bias[slot], alpha=scale)
        return bias if self.bias is None else bias.add_(self.bias)

    def unmerge(self) -> None:
        self.merged_weight = self.merged_kernel = self.merged_bias = None
        if self.int8 is not None:  # the memory int8 saves: a full-precision copy only while merged
            self._merge_buffer = None

    def extra_repr(self) -> str:
        kind = "conv1d" if self.is_conv1d else "int8 linear" if self.int8 is not None else "linear"
        return f"{kind}, in={self.in_features}, out={self.out_features}, slots={self.num_slots}, max_rank={self.max_rank}"
