"""What a model's attention really is, read by running its own forward once on two tokens.

The engine replaces each attention call with pool attention (attention.py), which sees only q, k, v
and the scale. Whatever else a family's attention does must be known before the first request, or
answers would be silently wrong: so the probe runs the stock forward once with a recording
attention function and a recording mask function registered under their own name, and reads:
  - the KV geometry each attention module really uses (KV heads, head dim, number of attention
    layers) from the keys it is handed, not from a config field that some families lack
    (GPT-2, GPT-NeoX and GPT-J have no `num_key_value_heads`) or spell differently;
  - the mask each layer is given, evaluated as a function of (query, key) positions: plain causal,
    a sliding window of W keys (HF's `kv > q - W`), or anything else (chunked, bidirectional...),
    which is refused;
  - every other argument handed to attention: attention sinks (`s_aux`) or an argument no family
    served so far passes are refused by name, so the next family cannot fail silently either
    (a logit softcap is served: pool attention applies it).
Families whose attention never reaches transformers' AttentionInterface (ALiBi models such as
BLOOM and MPT) or whose layers are not all attention (Jamba's state-space layers) are refused too.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .model_loader import ModelLoadError

PROBE_NAME = "loraserve_probe"
# Masks are evaluated up to here, past any context the engine serves (an explicit --max-model-len
# may pass max_position_embeddings): a window of W keys shows as W keys at the last position.
PROBED_POSITIONS = 1 << 20
# Arguments transformers hands attention that pool attention reads (the scale, Gemma 2's logit
# softcap) or may ignore: bookkeeping, dropout (0 in eval), and `sliding_window`, which the layer's
# mask states as well.
SERVED_ARGUMENTS = frozenset(
    {"dropout", "scaling", "softcap", "position_ids", "cache_position", "use_cache", "output_attentions"}
    | {"output_router_logits", "sliding_window", "is_causal"}
)
KNOWN_FEATURES = {"s_aux": "attention sinks"}


class UnsupportedModelError(ModelLoadError):
    """The model's family or one of its attention features is not served; the message names it."""


@dataclass(frozen=True)
class LayerAttention:
    """What one attention layer computes, as far as the KV pool and pool attention are concerned."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    window: int | None  # keys a row sees, itself included; None: every earlier key (plain causal)


@dataclass(frozen=True)
class AttentionShape:
    """The model's attention layers, in pool order (layer_idx): one KV pool per layer."""

    layers: tuple[LayerAttention, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_kv_heads(self) -> int:
        return self.layers[0].num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.layers[0].head_dim

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token in every layer."""
        return sum(2 * layer.num_kv_heads * layer.head_dim for layer in self.layers) * dtype.itemsize


@dataclass
class _Call:
    layer_idx: int | None
    query: torch.Size  # [1, H, N, D]
    key: torch.Size  # [1, KVH, N, D]
    value: torch.Size
    mask: object
    arguments: dict


class _ProbeMask:
    """What the probe's mask function hands each layer in place of a mask: the model's own mask rule."""

    def __init__(self, mask_function):
        self.mask_function = mask_function


def probe_attention(model: torch.nn.Module) -> AttentionShape:
    """Run `model` once on two tokens and return its attention layers; raises UnsupportedModelError
    naming the architecture and the feature the engine does not serve."""
    name = type(model).__name__
    calls = _record_calls(model, name)
    num_layers = getattr(model.config, "num_hidden_layers", None)
    if not calls:
        raise UnsupportedModelError(
            f"{name}: its attention does not run through transformers' AttentionInterface (as ALiBi "
            "models' attention does not), so the engine's KV-pool attention cannot serve it"
        )
    indices = [call.layer_idx for call in calls]
    if None in indices or sorted(indices) != list(range(len(calls))) or len(calls) != (num_layers or len(calls)):
        raise UnsupportedModelError(
            f"{name}: {len(calls)} attention calls for {num_layers} layers: layers without attention of their "
            "own (recurrent or state-space layers, shared attention) are not served"
        )
    windows: dict[int, int | None] = {}  # by mask: layers of one kind share their mask rule
    layers = [_layer(name, call, windows) for call in sorted(calls, key=lambda call: call.layer_idx)]
    if len({(layer.num_kv_heads, layer.head_dim) for layer in layers}) > 1:
        raise UnsupportedModelError(f"{name}: layers with different KV shapes are not served")
    return AttentionShape(tuple(layers))


def _record_calls(model: torch.nn.Module, name: str) -> list[_Call]:
    calls: list[_Call] = []
    previous = model.config._attn_implementation
    device = next(model.parameters()).device
    token = _recording.set(calls)
    try:
        model.set_attn_implementation(PROBE_NAME)
        with torch.no_grad():
            model(
                input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                position_ids=torch.arange(2, device=device)[None],
                use_cache=False,
            )
    except Exception as exc:  # a family that does arithmetic on its mask (Falcon's ALiBi) or has no interface
        raise UnsupportedModelError(
            f"{name}: its forward does not run with the engine's attention plugged in ({type(exc).__name__}: {exc})"
        ) from exc
    finally:
        _recording.reset(token)
        if previous is not None:
            model.set_attn_implementation(previous)
    return calls


# The probe's calls, per thread: two engines built at once each record their own model.
_recording: ContextVar[list[_Call] | None] = ContextVar("loraserve_probe_calls", default=None)


def _record(module, query, key, value, attention_mask, **arguments):
    """The probe's attention function: note what the layer hands attention, then attend causally."""
    layer_idx = getattr(module, "layer_idx", None)
    _recording.get().append(_Call(layer_idx, query.shape, key.shape, value.shape, attention_mask, arguments))
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    return out.transpose(1, 2), None  # [1, N, H, D], as attention functions return it


AttentionInterface.register(PROBE_NAME, _record)
AttentionMaskInterface.register(PROBE_NAME, lambda mask_function, **kwargs: _ProbeMask(mask_function))


def _layer(name: str, call: _Call, windows: dict[int, int | None]) -> LayerAttention:
    where = f"{name} layer {call.layer_idx}"
    num_heads, num_kv_heads, head_dim = call.query[1], call.key[1], call.key[-1]
    if call.query[-1] != head_dim or call.value[-1] != head_dim or num_heads % num_kv_heads:
        raise UnsupportedModelError(
            f"{where}: queries {tuple(call.query)}, keys {tuple(call.key)} and values {tuple(call.value)} "
            "are not grouped-query attention of one head width (multi-head latent attention is not served)"
        )
    for argument, value in call.arguments.items():
        if argument in SERVED_ARGUMENTS or value is None or value is False:
            continue
        feature = KNOWN_FEATURES.get(argument, f"the attention argument {argument!r}")
        raise UnsupportedModelError(
            f"{where} uses {feature} ({argument}={_brief(value)}), which the engine does not implement"
        )
    if call.arguments.get("dropout", 0.0) or call.arguments.get("is_causal", True) is False:
        raise UnsupportedModelError(f"{where}: attention with dropout or without a causal mask is not served")
    if not isinstance(call.mask, _ProbeMask):
        raise UnsupportedModelError(
            f"{where}: its attention mask is built by the model itself, not by transformers' mask rules"
        )
    if id(call.mask) not in windows:
        windows[id(call.mask)] = mask_window(call.mask.mask_function, PROBED_POSITIONS, where)
    return LayerAttention(num_heads, num_kv_heads, head_dim, windows[id(call.mask)])


def mask_window(mask_function, num_positions: int, where: str = "the model") -> int | None:
    """The keys each row of `mask_function` sees, itself included, when it is a causal sliding
    window (None: plain causal over all `num_positions`); raises UnsupportedModelError for any other
    rule. The window is the last row's span (found by bisection); rows near its edge and far from
    it are then checked against `q - window < kv <= q`, densely around the edge, sampled elsewhere."""
    last = num_positions - 1
    lo, hi = 0, last  # the last row's first visible key, if the rule is a band
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _sees(mask_function, last, torch.tensor([mid]))[0] else (mid + 1, hi)
    window = last + 1 - lo
    for q in sorted(q for q in {0, 1, window - 1, window, window + 1, last // 2, last - 1, last} if 0 <= q <= last):
        edges = [k + d for k in (q - window, q) for d in range(-2, 3) if 0 <= k + d <= q + 1]
        keys = torch.cat((torch.tensor(edges), torch.linspace(0, q, 257).long())).unique()
        if not torch.equal(_sees(mask_function, q, keys), (keys <= q) & (keys > q - window)):
            raise UnsupportedModelError(
                f"{where}: its attention mask is neither causal nor a causal sliding window (at position {q}), "
                "a kind the engine does not implement"
            )
    return None if window >= num_positions else window


def _sees(mask_function, q: int, keys: torch.Tensor) -> torch.Tensor:
    """Whether query position q may see each of `keys`, as the model's mask rule says."""
    zero = torch.tensor(0)
    return torch.as_tensor(mask_function(zero, zero, torch.tensor(q), keys)).expand(keys.shape)


def _brief(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)
