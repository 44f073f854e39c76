"""LoraLinear: a base Linear or Conv1D with per-slot LoRA buffers and an optional merged weight."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .backends import dense_kernel, quantized_kernel
from .batch import STACK_MAX_ROWS, LoraBatch
from .blocks import BlockWeight
from .factor_values import slot_values
from .kernels import INT8_WEIGHT, PLAIN, Conv1dLinear, Int8Weight, KernelRule
from .ops import SlotExtras, add_lora, add_lora_rows, add_lora_stacked
from .peft_format import LoraWeights
from .slots import LoraSlots, LoraState


class LoraLinear(LoraSlots):
    """Computes x @ W + each row's own LoRA delta (gather mode) or x @ (W0 + delta) (merged mode).

    Slots, merge and unmerge as LoraSlots (W0 never written); this adds the base matmul, LoRA
    biases and DoRA. The base matmul is a kernel the plan picks per weight (kernel_plan.py): MKL,
    oneDNN-packed (`use_kernels`), or quantized (`quantize`: int8, or Q4_1/Q8_0 blocks), which drops
    the full-precision W0: `base_weight()` dequantizes it for the few readers of its values (merges,
    DoRA norms, per-row copies).
    """

    def __init__(self, base: nn.Linear | Conv1D, state: LoraState, num_slots: int, max_rank: int):
        is_conv1d = isinstance(base, Conv1D)  # GPT-2 layout: weight is [in, out]
        in_features, out_features = base.weight.shape if is_conv1d else base.weight.shape[::-1]
        super().__init__(state, num_slots, max_rank, in_features, out_features, base.weight)
        self.is_conv1d = self.weight_is_in_out = is_conv1d
        self.is_head = False  # the output head sees only the rows the step keeps (LoraBatch.head)
        self.weight, self.bias = base.weight, base.bias
        self.extras: SlotExtras | None = None  # lora biases and DoRA scales, once a slot has one
        self.quantized: Int8Weight | BlockWeight | None = None  # W0 quantized, once it is
        self.dense_rule = KernelRule.single(PLAIN)  # kernels for full-precision weights: W0, merged weights
        self.kernel = self._dense_kernel(self.weight, self.bias)  # x -> x @ W0 + bias
        self._merged_kernel = None  # x -> x @ (W0 + delta) + bias, built at its first use while merged
        self.merge_serial = 0  # counts merges: which merged weights a kernel built elsewhere is of
        self.merged_bias: torch.Tensor | None = None  # bias + the adapter's, while merged with one
        self._stack: tuple | None = None  # (layout, A_stackᵀ, B_stack) of the last stacked step

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        merged = self.merged_kernel
        return (self.kernel if merged is None else merged)(x)

    @property
    def merged_kernel(self):
        """The merged weight's kernel while merged, else None. Built on first use, not at the merge:
        a member of a fused group never runs its own, and packing one costs as much as the merge."""
        if self.merged_weight is None:
            return None
        if self._merged_kernel is None:
            bias = self.bias if self.merged_bias is None else self.merged_bias
            self._merged_kernel = self._dense_kernel(self.merged_weight, bias)
        return self._merged_kernel

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        if self.is_head:
            batch = batch.head_batch
        if batch.rows is not None:
            return add_lora_rows(
                y, x, self.lora_a, self.lora_b, batch.rows, self.extras, self.slot_ranks, self.rank_table
            )
        stacked = self.stacked(batch)
        if stacked is not None:
            return add_lora_stacked(y, x, *stacked)
        return add_lora(y, x, self.lora_a, self.lora_b, self.slot_ranks, batch, self.extras)

    def set_slot(self, slot: int, weights: LoraWeights | None) -> None:
        self._stack = None  # its copies of the slots' factors would be stale
        super().set_slot(slot, weights)

    def stacked(self, batch: LoraBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(A_stackᵀ, B_stack, mask) for add_lora_stacked where it beats a call pair per run: a step of
        few rows (decode), all of them runs, two or more of those runs on slots that target this layer,
        their ranks summing to a few columns, no LoRA bias or DoRA. The stacked weights are copies,
        kept for the next step while the layout (slots and ranks) holds; loading a slot drops them."""
        if batch.groups is not None or batch.num_tokens > STACK_MAX_ROWS or self.extras is not None:
            return None
        plan = batch.stack_plan(tuple(self.slot_ranks), self.dtype, self.device)  # shared by like layers
        if plan is None:
            return None
        layout, mask = plan
        if self._stack is None or self._stack[0] != layout:
            a_stack = torch.cat([self.slot_a(slot, rank) for slot, rank in layout])
            b_stack = torch.cat([self.lora_b[slot, :rank] for slot, rank in layout])
            self._stack = (layout, a_stack.T.contiguous(), b_stack)  # Aᵀ [in, Σr]: see add_lora_stacked
        return self._stack[1], self._stack[2], mask

    def use_kernels(self, dense: KernelRule) -> None:
        """Run full-precision weights (W0 unless quantized, and merged weights) by `dense`."""
        self.dense_rule = dense
        if self.quantized is None:
            self.kernel = self._dense_kernel(self.weight, self.bias)

    def run_w0_plainly(self) -> None:
        """Multiply by W0 on the plain kernel, keeping `dense_rule` for merged weights: a fused group
        (fused.py) runs this layer's W0 from its own packed copy, so this one's would be a second."""
        if self.quantized is None and not self.is_conv1d:
            self.kernel = dense_kernel(KernelRule.single(PLAIN), self.weight, self.bias)

    def quantize(self, kind: str, rule: KernelRule, scratch: torch.Tensor | None, keep_weight: bool = False) -> None:
        """Run W0 quantized to `kind` (int8, or blocks.py's q4_1 or q8_0) by `rule`, and drop its full-precision
        copy unless `keep_weight` (the head: tied to the embedding, it stays resident anyway)."""
        assert not self.is_conv1d and self.merged_weight is None
        w = self.weight
        self.quantized = Int8Weight.quantize(w) if kind == INT8_WEIGHT else BlockWeight.quantize(w, kind)
        self.kernel = quantized_kernel(rule, self.quantized, self.bias, self.dtype, scratch)
        if not keep_weight:
            del self.weight

    def base_weight(self) -> torch.Tensor:
        """W0 in the model's dtype and this layer's layout, as the base matmul uses it: dequantized
        into a new tensor if quantized (off the hot path)."""
        return self.weight if self.quantized is None else self.quantized.dequantize(self.dtype)

    @property
    def packed_weight(self) -> torch.Tensor | None:
        """The oneDNN-packed W0 the base matmul uses (for some row counts at least), if any."""
        return self.kernel.packed

    def _dense_kernel(self, weight: torch.Tensor, bias: torch.Tensor | None):
        return Conv1dLinear(weight, bias) if self.is_conv1d else dense_kernel(self.dense_rule, weight, bias)

    def _dora_scale(self, weights: LoraWeights) -> torch.Tensor | None:
        """DoRA's g = m / ‖W0 + B·A‖ per output feature (PEFT's column norm), computed once per load."""
        if weights.magnitude is None:
            return None
        w0 = self.base_weight().float()
        a = slot_values(weights.a, 1.0, self.dtype).float()  # [r, in], as the slot holds it
        b = slot_values(weights.b, weights.scale, self.dtype).float()  # [r, out]
        if self.is_conv1d:
            norm = torch.linalg.vector_norm(torch.addmm(w0, a.T, b), dim=0)  # [in, out] -> [out]
        else:
            norm = torch.linalg.vector_norm(torch.addmm(w0, b.T, a), dim=1)  # [out, in] -> [out]
        return (weights.magnitude.float() / norm).to(self.dtype)

    def _set_extras(self, slot: int, weights: LoraWeights | None) -> None:
        bias = None if weights is None else weights.bias
        dora_scale = None if weights is None else self._dora_scale(weights)
        if self.extras is None:
            if bias is None and dora_scale is None:
                return
            self.extras = SlotExtras(has_bias=[False] * self.num_slots, is_dora=[False] * self.num_slots)
        extras, factory = self.extras, dict(dtype=self.dtype, device=self.device)
        if (bias is not None and extras.bias is None) or (dora_scale is not None and extras.dora_scale is None):
            self.state.layout_version += 1  # a table the forward reads from now on
        extras.has_bias[slot], extras.is_dora[slot] = bias is not None, dora_scale is not None
        # A slot without a term holds the identity (bias 0, scale 1, shift 0): the row kernels read
        # every slot's entry, so an old adapter's must not linger.
        if bias is not None and extras.bias is None:
            extras.bias = torch.zeros(self.num_slots, self.out_features, **factory)
        if extras.bias is not None:
            extras.bias[slot].copy_(bias) if bias is not None else extras.bias[slot].zero_()
        if dora_scale is not None and extras.dora_scale is None:
            # One row past the slots: the identity, which base rows (BASE_SLOT = -1) index (ops.add_lora_rows).
            extras.dora_scale = torch.ones(self.num_slots + 1, self.out_features, **factory)
            extras.dora_shift = torch.zeros(self.num_slots + 1, self.out_features, **factory)
        if extras.dora_scale is not None and dora_scale is None:
            extras.dora_scale[slot].fill_(1)
            extras.dora_shift[slot].zero_()
        elif dora_scale is not None:
            extras.dora_scale[slot].copy_(dora_scale)
            extras.dora_shift[slot].copy_((1 - dora_scale) * self.bias if self.bias is not None else 0 * dora_scale)

    def _merge_source(self, buffer: torch.Tensor) -> torch.Tensor:
        """W0, or a quantized W0 dequantized into `buffer` (read by the first term, summed over in place)."""
        return self.weight if self.quantized is None else self.quantized.dequantize(self.dtype, out=buffer)

    def _finish_merge(self, merged: torch.Tensor, terms: list[tuple[int, float]]) -> None:
        """DoRA: g ⊙ (W0 + delta) (never composed); and the merged LoRA biases."""
        slot = terms[0][0]
        if self.extras is not None and self.extras.is_dora[slot]:
            assert len(terms) == 1, "DoRA adapters are never composed"
            g = self.extras.dora_scale[slot]
            merged.mul_(g[None, :] if self.is_conv1d else g[:, None])
        self.merged_bias = self._merged_bias(terms)

    def _merged_bias(self, terms: list[tuple[int, float]]) -> torch.Tensor | None:
        """bias + Σ scale·(lora bias of slot), or None where no term has one: the base's bias stands."""
        extras = self.extras
        with_bias = [] if extras is None else [(slot, scale) for slot, scale in terms if extras.has_bias[slot]]
        if not with_bias:
            return None
        bias = torch.zeros(self.out_features, dtype=self.dtype, device=self.device)
        for slot, scale in with_bias:
            bias.add_(extras.bias[slot], alpha=scale)
        return bias if self.bias is None else bias.add_(self.bias)

    def _use_merged(self, merged: torch.Tensor) -> None:
        super()._use_merged(merged)
        self._merged_kernel = None
        self.merge_serial += 1

    def unmerge(self) -> None:
        super().unmerge()
        self._merged_kernel = self.merged_bias = None
        if self.quantized is not None:  # the memory quantizing saves: a full-precision copy only while merged
            self._merge_buffer = None

    def extra_repr(self) -> str:
        kind = (
            "conv1d" if self.is_conv1d else f"{self.quantized.kind} linear" if self.quantized is not None else "linear"
        )
        return (
            f"{kind}, in={self.in_features}, out={self.out_features}, slots={self.num_slots}, max_rank={self.max_rank}"
        )
