"""wrap_model: put LoRA layers on a stock transformers model in one pass, and drive them per step."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch import LoraBatch, with_rows
from .embedding import LoraEmbedding
from .errors import MergeBudgetError
from .experts import ExpertSlots, wrap_experts
from .kernel_plan import apply_kernel_plan
from .kernels import KernelPlan
from .layer import LoraLinear, LoraState
from .parameters import ParamShape
from .peft_format import LoraAdapter, TargetSpec
from .router import wrap_routers
from .saved import PerRowModule, row_modules

SlotMix = tuple[tuple[int, float], ...]  # ((slot, scale), ...): where a row's deltas come from, Σ scale·delta(slot)
BASE_MIX: SlotMix = ()  # the base model alone; one adapter is ((slot, 1.0),)


class LoraModel:
    """A frozen base model whose Linear/Conv1D layers carry `max_loras` adapter slots.

    One of two modes holds at a time: merged (one slot folded into the weights, zero per-token
    cost) or gather (W0 clean, each token row gets its slot's delta inside the same forward).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: dict[str, LoraLinear | LoraEmbedding],
        state: LoraState,
        max_loras: int,
        max_rank: int,
        params: dict[str, ExpertSlots | LoraLinear] | None = None,
    ):
        self.model, self.layers, self.state = model, layers, state
        self.params = params or {}  # LoRA on parameters (target_parameters): MoE experts and routers
        self.max_loras, self.max_rank = max_loras, max_rank
        self.slot_ranks = [0] * max_loras  # largest rank of the adapter in each slot; 0 = empty
        self.dora_slots: frozenset[int] = frozenset()  # slots holding a DoRA adapter: their rows run directly
        self.copy_slots: frozenset[int] = frozenset()  # slots holding full module copies: direct runs too
        self.copies: dict[str, PerRowModule] = {}  # installed on first load of a copy of that module
        self.merged: SlotMix | None = None  # what merge() folded into the weights; None: W0 alone
        self.row_kernels = False  # LoRA linears run the row kernels (lora_kernels.py): set on CUDA
        self.merge_budget: int | None = None  # bytes merge buffers may hold (--merge-memory); None: no limit
        names = frozenset(name for name, _ in model.named_modules() if name)
        shapes = {name: (layer.in_features, layer.out_features) for name, layer in layers.items()}
        base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
        # The embedding and the head: a saved copy of their weight is compared with these at parse.
        full_weights = {
            name: layer.weight for name, layer in layers.items() if isinstance(layer, LoraEmbedding) or layer.is_head
        }
        embeddings = frozenset(name for name, layer in layers.items() if isinstance(layer, LoraEmbedding))
        head = next((name for name, layer in layers.items() if getattr(layer, "is_head", False)), None)
        tied = head is not None and any(full_weights[head] is full_weights[name] for name in embeddings)
        self.spec = TargetSpec(
            shapes,
            names,
            base_name,
            full_weights,
            embeddings,
            head if tied else None,
            row_modules(model),
            {name: _param_shape(slots) for name, slots in self.params.items()},
            tuple(name for name, _ in model.named_parameters()),
        )
        self.head = next((layer for layer in layers.values() if getattr(layer, "is_head", False)), None)

    def load_slot(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into device slot `slot`; layers it does not target get zeros there."""
        self.state.slots_version += 1
        if self._merged_uses(slot):
            self.unmerge()
        for name, layer in [*self.layers.items(), *self.params.items()]:
            layer.set_slot(slot, adapter.weights.get(name))
        for name in adapter.modules.keys() - self.copies.keys():
            self._install_copies(name)
        for name, module in self.copies.items():
            module.set_slot(slot, adapter.modules.get(name))
        self.slot_ranks[slot] = adapter.rank
        self.dora_slots = self.dora_slots | {slot} if adapter.is_dora else self.dora_slots - {slot}
        self.copy_slots = self.copy_slots | {slot} if adapter.modules else self.copy_slots - {slot}

    def _install_copies(self, name: str) -> None:
        """Put a PerRowModule around module `name` (on the engine thread, between steps)."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        base = getattr(parent, child)
        module = PerRowModule(base, self.state, is_head=getattr(base, "is_head", False))
        setattr(parent, child, module)
        self.copies[name] = module
        self.state.layout_version += 1  # a new module in the forward: captured graphs are stale

    def clear_slot(self, slot: int) -> None:
        self.state.slots_version += 1
        if self._merged_uses(slot):
            self.unmerge()
        for layer in [*self.layers.values(), *self.copies.values(), *self.params.values()]:
            layer.set_slot(slot, None)
        self.slot_ranks[slot] = 0
        self.dora_slots = self.dora_slots - {slot}
        self.copy_slots = self.copy_slots - {slot}

    def merge(self, mix: SlotMix | int) -> None:
        """Fold Σ scale·delta(slot) of `mix` into the weights (a bare slot number, as scripts and
        tests pass it: that adapter at scale 1); replaces whatever was merged before."""
        mix = ((mix, 1.0),) if isinstance(mix, int) else tuple(mix)
        assert mix and all(self.slot_ranks[slot] > 0 for slot, _ in mix), f"a slot of {mix} is empty"
        self._fit_merge_buffers(mix)
        try:
            for layer in [*self.layers.values(), *self.copies.values(), *self.params.values()]:
                layer.merge(list(mix))
        except Exception:
            self.unmerge()
            raise
        self.merged = mix

    def unmerge(self) -> None:
        """Back to the base weights: no arithmetic, W0 was never written."""
        for layer in [*self.layers.values(), *self.copies.values(), *self.params.values()]:
            layer.unmerge()
        self.merged = None

    @property
    def merge_buffer_bytes(self) -> int:
        """Memory the merge buffers hold now (each layer keeps its buffer for the next merge)."""
        return sum(layer.merge_buffer_bytes for layer in self.merging_layers)

    @property
    def merging_layers(self) -> list[LoraLinear | LoraEmbedding | ExpertSlots]:
        """The layers whose merges take a buffer the size of their W0 (--merge-memory counts them)."""
        return [*self.layers.values(), *self.params.values()]

    def _fit_merge_buffers(self, mix: SlotMix) -> None:
        """Keep merge buffers within `merge_budget`: a merge that needs more than the budget raises
        MergeBudgetError (its rows are served gathered); one that fits alone but not beside the
        buffers other merges left frees those first (the merge replaces theirs anyway)."""
        if self.merge_budget is None:
            return
        needed = [layer for layer in self.merging_layers if layer.targets(mix)]
        need = sum(layer.weight_bytes for layer in needed)
        if need > self.merge_budget:
            raise MergeBudgetError(
                f"merging needs {need / 2**20:.0f} MiB of merge buffers; --merge-memory allows "
                f"{self.merge_budget / 2**20:.0f} MiB"
            )
        if self.merge_buffer_bytes + need - sum(layer.merge_buffer_bytes for layer in needed) > self.merge_budget:
            self.unmerge()
            for layer in self.merging_layers:
                if not layer.targets(mix):
                    layer.release_merge_buffer()

    def _merged_uses(self, slot: int) -> bool:
        """Whether the merged weights hold slot `slot`'s delta: then new contents there must unmerge
        them, or a later step on the same slots would run the old adapter."""
        return self.merged is not None and any(merged == slot for merged, _ in self.merged)

    @property
    def has_head_lora(self) -> bool:
        """Whether a loaded adapter changes the output head: then each step says which rows reach it."""
        if self.head is not None and any(self.head.slot_ranks):
            return True
        return any(module.is_head and module.copies for module in self.copies.values())

    def build_batch(
        self, token_slots: torch.Tensor, token_scales: torch.Tensor | None = None, keep: torch.Tensor | None = None
    ) -> LoraBatch | None:
        """Per-step metadata for `token_slots` ([N], -1 = base; [K, N] with `token_scales` for composed
        rows) and the rows `keep` that reach the output head; None when every row is base."""
        batch = LoraBatch.build(
            token_slots,
            device=self.device,
            token_scales=token_scales,
            direct_slots=self.dora_slots | self.copy_slots,
            keep=keep,
        )
        if batch is None or not self.row_kernels:
            return batch
        return with_rows(batch, token_slots, token_scales, keep, self.max_loras, self.device)

    @contextmanager
    def gather(self, batch: LoraBatch | None):
        """Run forwards inside this block with each token row's own adapter applied."""
        assert batch is None or self.merged is None, "gather needs unmerged weights"
        self.state.batch = batch
        try:
            yield
        finally:
            self.state.batch = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The base model's floating dtype (an int8 base keeps its activations' dtype elsewhere)."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())


def wrap_model(
    model: nn.Module,
    *,
    max_loras: int = 4,
    max_rank: int = 64,
    kernels: KernelPlan = KernelPlan(),
    quantization: str | None = None,
) -> LoraModel:
    """Give every Linear/Conv1D, the output head and the input embedding LoRA slots, in place, in
    one pass; freeze the base. MoE experts' stacked projections and their routers get slots too
    (`params`, for PEFT's target_parameters: experts.py, router.py).

    The head is a LoraLinear that sees only the rows the step keeps (LoraBatch.head). A slot that
    targets neither the head nor the embedding costs them nothing: base-only forwards run the
    stock lookup and matmul. `kernels`: which kernel runs each linear's weights (the default:
    plain F.linear everywhere; `KernelPlan(PACKED)`: oneDNN-packed copies on CPU, one more copy in
    memory; or rules measured per weight shape, kernel_plan.py). `quantization`: "int8" (weight-only
    int8 base linears) or "q4_1" (Q4_1 linears, a Q8_0 head): kernel_plan.quantized_kind.
    """
    model.requires_grad_(False)
    state = LoraState()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    layers: dict[str, LoraLinear | LoraEmbedding] = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, (nn.Linear, Conv1D)):
            layer = LoraLinear(module, state, max_loras, max_rank)
            layer.is_head = module is head
        elif type(module) is nn.Embedding and module is embedding:
            layer = LoraEmbedding(module, state, max_loras, max_rank)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        layers[name] = layer
    apply_kernel_plan([layer for layer in layers.values() if isinstance(layer, LoraLinear)], kernels, quantization)
    experts = wrap_experts(model, state, max_loras, max_rank)
    experts_modules = sorted({name.rpartition(".")[0] for name in experts})
    params = {**experts, **wrap_routers(model, experts_modules, state, max_loras, max_rank)}
    return LoraModel(model, layers, state, max_loras, max_rank, params)


def _param_shape(slots: ExpertSlots | LoraLinear) -> ParamShape:
    return ParamShape(getattr(slots, "num_experts", 0), slots.in_features, slots.out_features)
