"""The Llama family's forward in one readable pass: the model's own modules, without its wrappers.

transformers' forward wraps every decoder layer and attention call in decorators, kwarg plumbing,
output records and mask builders: at one decode row per step, glue rather than arithmetic (one
stream ran 9% faster without it on the 2-core AMD EPYC). This pass calls the same submodules (so
LoRA layers, per-row module copies and
RMSNorm modules run exactly as they do there) and the same tensor ops in the same order, so its
logits equal the stock forward's bit for bit where no layers are fused (tests/engine/test_lean_forward.py).
Packed q/k/v and gate/up each run as one base matmul (adapters/fused.py): equal up to float
rounding (bit for bit on the AVX-512 box it was measured on). Two spots are rewritten exactly, not
approximately:
  - rotate_half(x) * sin, which is cat(-x2, x1) * sin, is computed as roll(x) * (sign-folded sin):
    a sign flip is exact in floating point, so each element is the same product;
  - cos/sin broadcast over heads are made once per step, not once per layer.
Families with other layer shapes (GPT-2, Qwen3's q/k norms, Gemma's scaled embeddings) keep the
stock forward: `lean_forward` returns None for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adapters.fused import FusedLinears

from .attention import KVStep, attend

# Decoder layers whose forward is exactly: pre-norm attention with rotary q/k, pre-norm gated MLP.
SUPPORTED = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
# Their RMSNorm classes share one forward, inlined by `_rms_norm` (a per-row copy keeps its own).
RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
SILU = frozenset({"SiLU", "SiLUActivation"})  # torch's and transformers' modules around F.silu


class LeanForward:
    """forward(input_ids [N], position_ids [N], rows [M], kv_step) -> logits [M, V] of the kept rows."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.head_dim = model.model.layers[0].self_attn.head_dim
        # Per layer: q/k/v and gate/up as one base matmul each (adapters/fused.py), where they can be.
        self.fused: dict[nn.Module, FusedLinears] = {}
        for layer in model.model.layers:
            for parent, names in (
                (layer.self_attn, ("q_proj", "k_proj", "v_proj")),
                (layer.mlp, ("gate_proj", "up_proj")),
            ):
                if (group := FusedLinears.of(parent, names)) is not None:
                    self.fused[parent] = group

    def __call__(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, rows: torch.Tensor, kv_step: KVStep
    ) -> torch.Tensor:
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids[None])  # [1, N, C]: the stock modules' shapes
        cos, sin = inner.rotary_emb(hidden, position_ids[None])  # [1, N, D]
        half = self.head_dim // 2
        cos, sin = cos[:, None], torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)[:, None]
        for layer in inner.layers:
            hidden = hidden + self._attention(
                layer.self_attn, _rms_norm(layer.input_layernorm, hidden), cos, sin, kv_step
            )
            mlp, x = layer.mlp, _rms_norm(layer.post_attention_layernorm, hidden)
            gate, up = self._project(mlp, x, "gate_proj", "up_proj")
            act = F.silu if type(mlp.act_fn).__name__ in SILU else mlp.act_fn
            hidden = hidden + mlp.down_proj(act(gate) * up)
        hidden = _rms_norm(inner.norm, hidden)
        return self.model.lm_head(hidden[:, rows])[0]

    def _attention(
        self, attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_step: KVStep
    ) -> torch.Tensor:
        shape = (1, x.shape[1], -1, self.head_dim)
        q, k, v = (y.view(shape).transpose(1, 2) for y in self._project(attn, x, "q_proj", "k_proj", "v_proj"))
        half = self.head_dim // 2
        q = q * cos + q.roll(half, dims=-1) * sin
        k = k * cos + k.roll(half, dims=-1) * sin
        out = attend(attn.layer_idx, q, k, v, attn.scaling, kv_step)  # [1, N, H, D]
        return attn.o_proj(out.reshape(1, x.shape[1], -1))

    def _project(self, parent: nn.Module, x: torch.Tensor, *names: str) -> list[torch.Tensor]:
        """Each named linear of `parent` applied to x: fused where a group serves them."""
        group = self.fused.get(parent)
        if group is not None and group.is_intact:
            return group(x)
        return [getattr(parent, name)(x) for name in names]


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The stock RMSNorm's ops without its module call (`rms_norm`); other norms run themselves."""
    if type(norm).__name__ not in RMS_NORMS:
        return norm(x)
    return rms_norm(x, norm.weight, norm.variance_epsilon)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm's ops in its order; its float32 casts are no-ops in float32."""
    h = x if x.dtype == torch.float32 else x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (h if h.dtype == x.dtype else h.to(x.dtype))


def lean_forward(model: nn.Module) -> LeanForward | None:
    """The lean pass for `model`, or None where its family keeps the stock forward."""
    if type(model).__name__ not in SUPPORTED:
        return None
    return LeanForward(model)
