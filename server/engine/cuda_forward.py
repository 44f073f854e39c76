"""The Llama family's forward on the CUDA step path: a decoder layer in about nine kernels.

The lean pass (lean_forward.py) runs the stock modules op by op: ~38 kernels per decoder layer for
base rows and ~52 with LoRA on all seven projections (8 per RMSNorm, 8 for RoPE, seven base GEMMs,
two launches per LoRA linear), each a few µs of GPU time even replayed from a graph. This pass
runs the same arithmetic as (benchmarks/decode_kernels.py counts them; docs/architecture.md):

    add_rms_norm -> qkv GEMM (+ one LoRA shrink/expand) -> rope_kv_write -> attention
    -> o GEMM (+ LoRA) -> add_rms_norm -> gate_up GEMM (+ LoRA) -> silu_mul -> down GEMM (+ LoRA)

with the residual add of each block folded into the next norm (layer_kernels.py), q/k/v and
gate/up each one GEMM over a fused weight that the members' W0 are views of (adapters/fused.py),
and each group's LoRA one grouped shrink and expand (adapters.ops.add_lora_group_rows). RoPE
reads cos/sin from a table made once by the model's own rotary module for every position up to
the served length, so a captured graph has no rotary update in it. That is exact for rope types
whose angles are a function of the position alone (default, linear, llama3, yarn); "dynamic" and
"longrope" rescale by the longest sequence of the batch, which no table of positions can follow,
so those models keep the lean pass. Attention is attention.py's on the row kernels (the layer's
sliding window, tiled prompt rows, split long-context decode), once the pool holds the step's K/V.
Members with LoRA biases or DoRA, and per-row module copies, take their own ops (correct, more
launches).
"""

from __future__ import annotations

import torch
from torch import nn

from adapters.fused import FusedLinears
from adapters.ops import add_lora_group_rows

from .attention import KVStep, attend_pool
from .layer_kernels import add_rms_norm, rope_kv_write, silu_mul
from .lean_forward import RMS_NORMS, SILU, SUPPORTED

TABLE_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})  # angles a function of position


class _Group:
    """Linears of one layer that read the same input: one base GEMM, then one grouped LoRA op."""

    def __init__(self, parent: nn.Module, names: tuple[str, ...], fused: FusedLinears):
        self.parent, self.names, self.fused = parent, names, fused

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # x [N, in] -> [N, Σ out]
        if not self.fused.is_intact:  # a per-row module copy replaced a member: its own forward
            return torch.cat([getattr(self.parent, name)(x) for name in self.names], dim=-1)
        y = self.fused.base(x)
        members = self.fused.members
        batch = members[0].state.batch
        if batch is None or all(m.lora_a is None for m in members):
            return y
        if batch.rows is None or any(m.extras is not None for m in members):
            for m, view in zip(members, y.split(self.fused.sizes, dim=-1)):
                if m.lora_a is not None:
                    m.add_delta(view, x, batch)  # the member's own ops, extras included
            return y
        lora_as, lora_bs = [m.lora_a for m in members], [m.lora_b for m in members]
        ranks, tables = [m.slot_ranks for m in members], [m.rank_table for m in members]
        return add_lora_group_rows(y, x, lora_as, lora_bs, self.fused.sizes, batch.rows, ranks, tables)


class CudaForward:
    """forward(input_ids [N], position_ids [N], rows [M], kv_step) -> logits [M, V] of the kept rows,
    as LeanForward; kv_step must carry the row kernels' key ranges (row_kv)."""

    def __init__(self, model: nn.Module, groups: list[tuple[_Group, _Group, _Group, _Group]], max_positions: int):
        self.model, self.groups = model, groups
        inner = model.model
        attn = inner.layers[0].self_attn
        self.head_dim, self.num_heads = attn.head_dim, model.config.num_attention_heads
        probe = torch.empty(0, dtype=inner.embed_tokens.weight.dtype, device=inner.embed_tokens.weight.device)
        positions = torch.arange(max_positions, device=probe.device)[None]
        cos, sin = inner.rotary_emb(probe, positions)  # [1, P, D], in the model's dtype as the stock forward's
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor, kv_step: KVStep
    ) -> torch.Tensor:
        inner, cache = self.model.model, kv_step.cache
        hidden = inner.embed_tokens(input_ids[None])[0]  # [N, C]
        residual = None
        for layer, (qkv, o, gate_up, down) in zip(inner.layers, self.groups):
            attn, index = layer.self_attn, layer.self_attn.layer_idx
            x, residual = _norm(layer.input_layernorm, hidden, residual)
            q = rope_kv_write(
                qkv(x), self.cos, self.sin, position_ids, kv_step.write_index, cache.k[index], cache.v[index],
                self.num_heads,
            )  # fmt: skip  # [N, H, D]
            out = attend_pool(index, q, attn.scaling, kv_step)  # [N, H, D]: the layer's window, tiles, splits
            x, residual = _norm(layer.post_attention_layernorm, o(out.view(out.shape[0], -1)), residual)
            hidden = down(silu_mul(gate_up(x)))
        x, _ = _norm(inner.norm, hidden, residual)
        return self.model.lm_head(x[rows])


def _norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x): one kernel for the stock RMSNorms, the module otherwise
    (a per-row copy of a norm keeps its own forward)."""
    if type(norm).__name__ in RMS_NORMS:
        return add_rms_norm(x, residual, norm.weight, norm.variance_epsilon)
    summed = x if residual is None else residual + x
    return norm(summed), summed


def cuda_forward(model: nn.Module, max_positions: int) -> CudaForward | None:
    """The CUDA pass for `model` (positions below `max_positions`), or None where it keeps the lean
    pass or the stock forward: another family or layer shape, a rope type no position table
    follows, an activation other than SiLU, or linears that cannot be fused."""
    if type(model).__name__ not in SUPPORTED:
        return None
    inner = model.model
    if getattr(inner.rotary_emb, "rope_type", "default") not in TABLE_ROPE_TYPES:
        return None
    parts = [
        ((layer.self_attn, ("q_proj", "k_proj", "v_proj")), (layer.self_attn, ("o_proj",)),
         (layer.mlp, ("gate_proj", "up_proj")), (layer.mlp, ("down_proj",)))
        for layer in inner.layers
    ]  # fmt: skip
    if any(type(layer.mlp.act_fn).__name__ not in SILU for layer in inner.layers):
        return None
    if not all(FusedLinears.fits(parent, names) for layer in parts for parent, names in layer):
        return None  # checked for every layer before any weight is shared
    groups = [
        tuple(_Group(parent, names, FusedLinears.of(parent, names, share_weights=True)) for parent, names in layer)
        for layer in parts
    ]
    return CudaForward(model, groups, max_positions)
