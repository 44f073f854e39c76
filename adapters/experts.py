"""LoRA on MoE experts: PEFT's `target_parameters` on the stacked expert weights, per row.

transformers keeps each MoE layer's experts as one module holding 3D parameters (`gate_up_proj`
[E, 2I, H], `down_proj` [E, H, I], or [E, in, out] where `is_transposed`) and dispatches its forward
by name through `ExpertsInterface`, as attention goes through AttentionInterface. We register
"loraserve" there: the stock module stays, and its forward becomes the one below, which applies each
token's own adapter on exactly the experts the router sent it to.

PEFT's ParamWrapper gives expert e of a slot its own pair: W_e + s·B_e·A_e. In the gather pass the
(token, expert) pairs are sorted by expert and, within one, by adapter; expert e's rows of adapter
s are then rows of a "virtual slot" s·E + e of A and B viewed as [S·E, R, ·], so `ops.add_lora`
applies them as it applies any linear's adapters (runs and padded groups), for both projections
with one per-layer batch. Merged, each expert stack is W0 + s·B_e·A_e in a separate buffer (one
baddbmm): W0 is never written, so unmerging is exact. Steps with no expert adapter (base rows,
attention-only adapters) run the implementation the model had before (grouped_mm by default).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from .batch import LoraBatch
from .errors import InvalidAdapterError
from .ops import add_lora
from .peft_format import LoraWeights
from .slots import LoraSlots, LoraState, unwritten_zeros

EXPERTS_NAME = "loraserve"


class ExpertSlots(LoraSlots):
    """Adapter slots for one stacked expert parameter: lora_a [S, E, R, in], lora_b [S, E, R, out]
    (scale folded into B), zero past each slot's rank; merged, W0 + s·B_e·A_e for every expert e."""

    def __init__(self, weight: nn.Parameter, state: LoraState, num_slots: int, max_rank: int, is_transposed: bool):
        num_experts, rows, cols = weight.shape
        in_features, out_features = (rows, cols) if is_transposed else (cols, rows)
        super().__init__(state, num_slots, max_rank, in_features, out_features, weight)
        self.weight_is_in_out = is_transposed  # W0 [E, in, out], else [E, out, in]
        self.num_experts = num_experts
        self.weight = weight
        self.virtual_ranks = [0] * num_slots * num_experts  # the rank of virtual slot s·E + e: slot s's

    def _allocate(self) -> None:
        self.state.layout_version += 1
        factory = dict(dtype=self.dtype, device=self.device)
        self.lora_a = unwritten_zeros((self.num_slots, self.num_experts, self.max_rank, self.in_features), **factory)
        self.lora_b = unwritten_zeros((self.num_slots, self.num_experts, self.max_rank, self.out_features), **factory)

    def _rows(self, slot: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start:stop of every expert's A and B in `slot` ([E, r, ·] views)."""
        return self.lora_a[slot, :, start:stop], self.lora_b[slot, :, start:stop]

    @torch.no_grad()
    def set_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """Copy A [E, r, in] and B [E, r, out] into `slot`, or clear it (None); as LoraSlots does,
        only the rows that change are written."""
        rank = 0 if weights is None else weights.a.shape[-2]
        self._write_rows(slot, weights, rank)
        self.slot_ranks[slot] = rank
        experts = self.num_experts
        self.virtual_ranks[slot * experts : (slot + 1) * experts] = [rank] * experts

    @torch.no_grad()
    def merge(self, terms: list[tuple[int, float]]) -> None:
        """W0 + Σ scale·B_e·A_e per expert into the merge buffer; W0 itself is never written."""
        terms = [(slot, scale) for slot, scale in terms if self.slot_ranks[slot]]
        if not terms:
            self.unmerge()
            return
        if self._merge_buffer is None:
            self._merge_buffer = torch.empty(self.weight_shape, dtype=self.dtype, device=self.device)
        merged, source = self._merge_buffer, self.weight
        for slot, scale in terms:
            rank = self.slot_ranks[slot]
            a, b = self.lora_a[slot, :, :rank], self.lora_b[slot, :, :rank]  # [E, r, in], [E, r, out]
            left, right = (a.transpose(1, 2), b) if self.weight_is_in_out else (b.transpose(1, 2), a)
            torch.baddbmm(source, left, right, alpha=scale, out=merged)  # [E, in, out] or [E, out, in]
            source = merged
        if self.dtype == torch.float16 and not torch.isfinite(merged).all():
            self.unmerge()
            raise InvalidAdapterError("merging would overflow this dtype (non-finite weights)")
        self._use_merged(merged)

    def project(self, x: torch.Tensor, counts: list[int], pairs: LoraBatch | None) -> torch.Tensor:
        """x [P, in]: (token, expert) pairs sorted by expert, counts[e] of them for expert e -> [P, out],
        each pair through its expert's weight and, where `pairs` says, its adapter's delta."""
        weight = self.weight if self.merged_weight is None else self.merged_weight
        y = x.new_empty(x.shape[0], self.out_features)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                w = weight[expert] if self.weight_is_in_out else weight[expert].T  # [in, out]
                torch.mm(x[start : start + count], w, out=y[start : start + count])
                start += count
        if pairs is not None and self.lora_a is not None:
            shape = (self.num_slots * self.num_experts, self.max_rank)
            a, b = self.lora_a.view(*shape, self.in_features), self.lora_b.view(*shape, self.out_features)
            add_lora(y, x, a, b, self.virtual_ranks, pairs)
        return y

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, slots={self.num_slots}"


class ExpertsLora:
    """One experts module's adapter slots (its up or gate-up projection, then its down projection)
    and the stock implementation its base steps keep."""

    def __init__(self, state: LoraState, up: ExpertSlots, down: ExpertSlots, stock: Callable):
        self.state, self.up, self.down, self.stock = state, up, down, stock

    def is_active(self) -> bool:
        """Whether this step needs our pass: merged expert weights, or a row whose adapter has experts."""
        if self.up.merged_weight is not None or self.down.merged_weight is not None:
            return True
        batch = self.state.batch
        if batch is None or (self.up.lora_a is None and self.down.lora_a is None):
            return False
        return any(self.up.slot_ranks[slot] or self.down.slot_ranks[slot] for slot in _step_slots(batch))

    def forward(self, module: nn.Module, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The experts' output for x [N, H] routed to top_k_index [N, k] with weights [N, k]."""
        if not self.is_active():
            return self.stock(module, x, top_k_index, top_k_weights)
        num_experts, batch = self.up.num_experts, self.state.batch
        num_tokens, k = top_k_index.shape
        expert = top_k_index.reshape(-1)  # [P]: pair p is token p // k's (p % k)-th choice
        token = torch.arange(num_tokens, device=x.device).repeat_interleave(k)  # [P]
        key = expert
        if batch is not None:  # by expert, then by the row's adapter: one run per (expert, adapter)
            first_slot = batch.token_slots.view(-1, num_tokens)[0].to(x.device)
            key = expert * (self.up.num_slots + 1) + first_slot[token] + 1
        order = torch.argsort(key, stable=True)
        expert, token, weight = expert[order], token[order], top_k_weights.reshape(-1)[order]
        counts = torch.bincount(expert, minlength=num_experts).tolist()
        pairs = None if batch is None else _pair_batch(batch, token, expert, num_experts)
        h = self.up.project(x[token], counts, pairs)  # [P, 2I] or [P, I]
        h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = self.down.project(h, counts, pairs)  # [P, H]
        if module.has_post_expert_norm:
            y = module.post_expert_norm(y)
        y = y * weight.unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def _step_slots(batch: LoraBatch) -> set[int]:
    slots = {run.slot for run in batch.runs}
    return slots | set(batch.groups.slot_list) if batch.groups is not None else slots


def _pair_batch(batch: LoraBatch, token: torch.Tensor, expert: torch.Tensor, num_experts: int) -> LoraBatch | None:
    """The step's batch over (token, expert) pairs: pair p's term of slot s is virtual slot s·E + expert."""
    num_tokens, device = batch.num_tokens, token.device
    token, expert = token.cpu(), expert.cpu()
    slots = batch.token_slots.view(-1, num_tokens)[:, token]  # [K, P]
    virtual = torch.where(slots >= 0, slots * num_experts + expert, -1)
    scales = None if batch.token_scales is None else batch.token_scales.view(-1, num_tokens)[:, token]
    if scales is None and virtual.shape[0] == 1:
        virtual = virtual[0]
    return LoraBatch.build(virtual, device=device, token_scales=scales)


def _experts_forward(module: nn.Module, hidden_states, top_k_index, top_k_weights):
    return module.lora.forward(module, hidden_states, top_k_index, top_k_weights)


ExpertsInterface.register(EXPERTS_NAME, _experts_forward)


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """name -> every experts module whose forward transformers dispatches by implementation name."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "has_gate") and hasattr(module, "is_transposed") and hasattr(module, "is_concatenated")
    }


def _projections(module: nn.Module) -> tuple[str, str] | None:
    """The names of the module's two stacked projections, or None where we cannot serve it (biases)."""
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    params = dict(module.named_parameters(recurse=False))
    if module.has_bias or any(name not in params or params[name].dim() != 3 for name in names):
        return None
    return names


def wrap_experts(model: nn.Module, state: LoraState, num_slots: int, max_rank: int) -> dict[str, ExpertSlots]:
    """Give every experts module of `model` adapter slots for its stacked projections and switch the
    model to our experts implementation; returns parameter name -> slots. None are made (and the
    model keeps its implementation) where some experts module cannot be served."""
    modules = expert_modules(model)
    if not modules or not hasattr(model, "set_experts_implementation"):
        return {}
    projections = {name: _projections(module) for name, module in modules.items()}
    if any(names is None for names in projections.values()):
        return {}
    previous = model.config._experts_implementation
    assert previous != EXPERTS_NAME, "this model's experts are wrapped already"
    slots: dict[str, ExpertSlots] = {}
    for name, module in modules.items():
        up, down = (
            ExpertSlots(getattr(module, param), state, num_slots, max_rank, module.is_transposed)
            for param in projections[name]
        )
        stock = ALL_EXPERTS_FUNCTIONS.get_interface(previous, type(module).forward.__wrapped__)
        module.lora = ExpertsLora(state, up, down, stock)
        slots[f"{name}.{projections[name][0]}"], slots[f"{name}.down_proj"] = up, down
    model.set_experts_implementation(EXPERTS_NAME)
    return slots
