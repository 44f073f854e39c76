"""Attention over the KV pool, plugged into stock transformers modules by name.

Registering "loraserve" in transformers' AttentionInterface makes the attention module of every
family it serves (model_families.py) call `pool_attention` after its own projections and rotary
embedding; the model code stays untouched. The step's metadata reaches it through `step_context`,
one context set once per step around the forward (nano-vllm's), not as a keyword: transformers
forwards keywords from `model(...)` only as far as each family's decoder layer passes its
`**kwargs` on, and some (Falcon, StableLM) drop them, so a keyword would need a patch per family.
The context is per thread (a ContextVar), so engines on two threads never see each other's step.
No mask is built by transformers for names it does not know, so packed inputs cost no [N, N] mask.

Sliding windows (Mistral, Qwen2/3, Gemma 2/3, Phi-3, ...) are per layer (`KVCache.windows`, read
from the model's own masks by attention_probe.py) and read-side: the pool keeps every token, and a
row at position p of a layer with window W attends keys p - W < kv <= p, transformers' rule. Per
sequence, the key view starts at the first key any of its new rows sees (a decode row reads only its
window), with a band mask where a chunk's rows span more than the window; the row kernel takes W as a
lower bound on each row's key range. Chunked prefill, prefix-cache hits and recompute after
preemption all write every position's K/V, so they need nothing more: a chunk's rows find the keys
before it in the pool.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .kv_cache import KVCache

ATTENTION_NAME = "loraserve"


@dataclass
class SeqSlice:
    """One sequence's part of a packed step."""

    query_start: int  # first row of its new tokens in the packed input
    num_new: int  # tokens it computes this step
    kv_start: int  # token offset of its extent in the pool
    context_len: int  # tokens in cache after this step (old + new)


@dataclass
class KVStep:
    """What attention needs for one packed step, built once per step by the runner."""

    cache: KVCache
    seqs: list[SeqSlice]  # in packed-row order: their outputs concatenate back into the rows
    write_index: torch.Tensor  # [N] pool positions for the new tokens' keys and values
    # [N] int32 pool start and length of each row's keys (a prompt row sees its sequence up to itself):
    # set, attention is one row-kernel call per layer (row_attention.py, CUDA); None, one SDPA per sequence
    row_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self):
        if self.row_kv is not None:
            # A step with a prompt chunk runs the tiled kernel over every row (tiled_attention.py).
            self.has_prompt_rows = any(s.num_new > 1 for s in self.seqs)
            self.max_context = max((s.context_len for s in self.seqs), default=0)  # 0: unknown (graphs)
            self._tiles: dict[int, torch.Tensor] = {}
            return
        # Each sequence's rows, key view and mask per distinct window (most models have one or two),
        # made once here rather than in every layer.
        device = self.write_index.device
        self.parts = {window: [_part(s, window, device) for s in self.seqs] for window in set(self.cache.windows)}

    def tiles(self, group: int) -> torch.Tensor:
        """The step's tiles of rows for the tiled kernel, for `group` query heads per KV head;
        made once per step."""
        from .tiled_attention import prompt_tiles, rows_per_tile

        rows = rows_per_tile(group)
        if rows not in self._tiles:
            chunks = [(s.query_start, s.num_new) for s in self.seqs]
            self._tiles[rows] = prompt_tiles(chunks, rows, self.write_index.device)
        return self._tiles[rows]


_current_step: ContextVar[KVStep | None] = ContextVar("loraserve_kv_step", default=None)


@contextmanager
def step_context(kv_step: KVStep) -> Iterator[None]:
    """Make `kv_step` the step every `pool_attention` call inside the block attends with."""
    token = _current_step.set(kv_step)
    try:
        yield
    finally:
        _current_step.reset(token)


def pool_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs):
    """Write the step's new K/V into the pool, then attend each sequence to its own extent.

    Semantics, per sequence s with new rows q_s and cached keys/values K_s, V_s (a view):
        out_s = softmax(cap(q_s K_s^T * scaling) + causal_mask) V_s
    where cap(x) = softcap * tanh(x / softcap) for a layer with a logit softcap (Gemma 2), else x.
    query: [1, H, N, D]; key, value: [1, KVH, N, D]. Returns ([1, N, H, D], None).
    One SDPA call per sequence, on views of the pool: padding the sequences into one batched call
    must copy their cache first, which measured 2.5x slower per layer on CPU.
    """
    kv_step = _current_step.get()
    assert kv_step is not None, "the loraserve attention runs only inside an engine step (step_context)"
    return attend(module.layer_idx, query, key, value, scaling, kv_step, softcap), None


def attend(
    layer: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    kv_step: KVStep,
    softcap: float | None = None,
) -> torch.Tensor:
    """`pool_attention`'s work for layer `layer`, shared with the lean forward; returns [1, N, H, D]."""
    k_pool, v_pool = kv_step.cache.k[layer], kv_step.cache.v[layer]  # [KVH, C, D]
    k_pool.index_copy_(1, kv_step.write_index, key[0])
    v_pool.index_copy_(1, kv_step.write_index, value[0])
    if kv_step.row_kv is not None:
        return _attend_rows(query, k_pool, v_pool, scaling, kv_step, softcap, kv_step.cache.windows[layer])
    k_pool, v_pool = k_pool[None], v_pool[None]
    sdpa = F.scaled_dot_product_attention if softcap is None else functools.partial(softcapped_sdpa, softcap=softcap)
    outs = [
        sdpa(
            query[:, :, rows],
            k_pool[:, :, ctx],
            v_pool[:, :, ctx],
            attn_mask=mask,
            is_causal=is_causal,
            scale=scaling,
            enable_gqa=True,
        )
        for rows, ctx, mask, is_causal in kv_step.parts[kv_step.cache.windows[layer]]
    ]  # one cat below: fewer ops than N slice-assigns
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
    return out.transpose(1, 2)  # [1, N, H, D]


def attend_pool(layer: int, query: torch.Tensor, scaling: float, kv_step: KVStep) -> torch.Tensor:
    """`attend` on the row kernels where the step's K/V are already in the pool (the CUDA pass writes
    them with RoPE in one kernel, cuda_forward.py). query [N, H, D]; returns [N, H, D]."""
    k_pool, v_pool = kv_step.cache.k[layer], kv_step.cache.v[layer]
    window = kv_step.cache.windows[layer]
    return _attend_rows(query.transpose(0, 1)[None], k_pool, v_pool, scaling, kv_step, None, window)[0]


def _attend_rows(query, k_pool, v_pool, scaling, kv_step: KVStep, softcap, window) -> torch.Tensor:
    """The CUDA step path, every row of the step in one launch: the tiled kernel where the step has
    a prompt chunk (a chunk's rows share each K/V load), else the row kernel, its keys split over
    programs where few rows have many (decode_splits). Returns [1, N, H, D]."""
    from .row_attention import decode_splits, row_attention, target_programs  # Triton: only where rows are used
    from .tiled_attention import tiled_attention

    q = query[0].transpose(0, 1)  # [N, H, D]
    starts, lengths = kv_step.row_kv
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kv_step.has_prompt_rows:
        tiles = kv_step.tiles(q.shape[1] // k_pool.shape[0])
        return tiled_attention(q, k_pool, v_pool, starts, lengths, tiles, scale, softcap, window)[None]
    keys = kv_step.max_context if window is None else min(window, kv_step.max_context)
    splits = decode_splits(q.shape[0], k_pool.shape[0], keys, target_programs(q.device))
    return row_attention(q, k_pool, v_pool, starts, lengths, scale, softcap, window, splits)[None]


def softcapped_sdpa(query, key, value, attn_mask, is_causal, scale, enable_gqa, softcap: float) -> torch.Tensor:
    """scaled_dot_product_attention with a logit softcap, which SDPA lacks, in the order of
    transformers' eager attention (Gemma 2): scores are capped, then masked, then softmaxed in fp32.
    query [1, H, T, D]; key, value [1, KVH, L, D] (enable_gqa: always grouped here)."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    scores = torch.tanh(query @ key.transpose(-1, -2) * scale / softcap) * softcap  # [1, H, T, L]
    if is_causal:
        attn_mask = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype) @ value


def _part(seq: SeqSlice, window: int | None, device) -> tuple[slice, slice, torch.Tensor | None, bool]:
    """The sequence's rows, the pool view of the keys they see, their mask (None: all of the view)
    and whether SDPA's own causal mask does it, for a layer with sliding window `window` (or None)."""
    rows = slice(seq.query_start, seq.query_start + seq.num_new)
    first = seq.context_len - seq.num_new  # position of the first new row
    if window is None or seq.context_len <= window:  # every row sees every earlier key
        view = slice(seq.kv_start, seq.kv_start + seq.context_len)
        return rows, view, _band_mask(first, seq.context_len, 0, None, device), seq.num_new == seq.context_len > 1
    lowest = max(0, first + 1 - window)  # the first key the first new row sees
    view = slice(seq.kv_start + lowest, seq.kv_start + seq.context_len)
    return rows, view, _band_mask(first, seq.context_len, lowest, window, device), False


def _band_mask(first: int, context_len: int, lowest: int, window: int | None, device) -> torch.Tensor | None:
    """Which keys from position `lowest` on each new row (positions first..context_len-1) sees:
    kv <= q, and kv > q - window where there is one; None where a view needs no mask: one row (its
    view is exactly its keys) or a whole prompt without a window (SDPA's is_causal does it)."""
    num_new = context_len - first
    if num_new == 1 or (num_new == context_len and window is None):
        return None
    queries = torch.arange(first, context_len, device=device)[:, None]
    keys = torch.arange(lowest, context_len, device=device)[None, :]
    mask = keys <= queries  # [t, context_len - lowest]
    return mask if window is None else mask & (keys > queries - window)


AttentionInterface.register(ATTENTION_NAME, pool_attention)
