"""Attention for every row of a step in one kernel launch per layer (the CUDA step path).

Semantics, for row t (a decode row, or one row of a prompt chunk) and query head h, with KV head
g = h // (H / KVH) (grouped-query attention), s = kv_start[t], L = kv_len[t], and the layer's
sliding window W (None: no window), which keeps a row's last W keys, b = max(0, L - W):
    out[t, h] = softmax(cap(q[t, h] · K[g, s + b : s + L]ᵀ · scale)) · V[g, s + b : s + L]
where cap(x) = softcap · tanh(x / softcap) when a softcap is given (Gemma 2's), else x.
A prompt row at position p of its sequence has L = p + 1: causality is in the lengths, so decode
and prefill rows, of any number of sequences, share one call. L = 0 (a padding row) gives zeros.
The window is a lower bound on the same key range: the row at position p keeps keys p - W < kv <= p,
transformers' sliding window (masking_utils' `kv_idx > q_idx - sliding_window`), so the loop starts
at b and reads only the window's blocks. W is a run-time argument: one compiled kernel for every layer.

Why per row: the KV pool keeps each sequence in one contiguous extent (kv_cache.py), so a row's
keys are one strided run. The loop over them reads its bound from kv_len, so one compiled kernel
serves every length and batch: no per-shape planning (cuDNN SDPA built a plan for every new
shape, 10x slower on fresh traffic), and a captured CUDA graph replays it with new lengths.
A program holds one row's query heads of one KV head (padded to tl.dot's 16 rows) and streams
the keys in blocks with an online softmax in float32 (FlashAttention's recurrence).
Steps with a prompt chunk run tiled_attention.py instead, the same semantics with a chunk's rows
sharing each K/V load; this kernel serves decode steps, eager and captured. A decode step of few
rows over long contexts would leave most of the GPU idle with one program per row and KV head, so
there each row's keys may be split over `num_splits` programs in shares of whole blocks (flash-
decoding): each writes its running max, sum and unnormalised output, and `_combine_splits_kernel`
rescales them to their common max (a share with no keys weighs nothing).
"""

from __future__ import annotations

import functools
import os

import torch

# Off CUDA the kernel runs only in Triton's interpreter (how its tests run on CPU). triton.jit reads
# the switch as it decorates the kernel (below), so it is set before that, and before the import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # the engine falls back to per-sequence SDPA
    HAVE_TRITON = False

BLOCK_N = 32  # keys per iteration
# Long-context decode with few rows splits each row's keys over programs (flash-decoding), at least
# SPLIT_KEYS keys each: fewer, and the partials' write and combine cost more than they spread.
SPLIT_KEYS = 256
MAX_SPLITS = 16
NO_WINDOW = 2**31 - 1  # the kernel's window where a layer has none: L - NO_WINDOW < 0 for every int32 L
INTERPRETED = False  # set below from what triton.jit made of the kernel


def row_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    num_splits: int = 1,
) -> torch.Tensor:
    """q [N, H, D] (any strides with a unit last one); k_pool, v_pool [KVH, C, D]; kv_start,
    kv_len [N] int32; softcap: the attention logit softcap, or None; window: the layer's sliding
    window in keys (a row's last `window` keys, itself included), or None; num_splits: programs per
    row and KV head, each over a share of its keys (`decode_splits`). Returns [N, H, D] in q's dtype."""
    if q.stride(2) != 1:  # the kernel steps rows and heads by stride, and dims by one
        q = q.contiguous()
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty(num_rows, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_rows == 0:
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Split: each program's running max and sum [2, N, H, S] and unnormalised output [N, H, S, BLOCK_D].
    stats = partial = out  # unread with one split
    if num_splits > 1:
        stats = torch.empty(2, num_rows, num_heads, num_splits, dtype=torch.float32, device=q.device)
        partial = torch.empty(num_rows, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
    _row_attention_kernel[(num_rows, num_kv_heads, num_splits)](
        q, k_pool, v_pool, out, stats, partial, kv_start, kv_len, scale, softcap or 1.0, window or NO_WINDOW,
        group, head_dim,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), out.stride(0), out.stride(1),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=BLOCK_N, DOT_FP32=_dot_in_fp32(q.dtype), SOFTCAP=softcap is not None, NUM_SPLITS=num_splits,
    )  # fmt: skip
    if num_splits > 1:
        _combine_splits_kernel[(num_rows, num_heads)](
            out, stats, partial, head_dim, out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )  # fmt: skip
    return out


@functools.cache
def target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: two per SM on CUDA; off CUDA (the interpreter) an H100's
    132 SMs, so tests split as the GPU would."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    return 2 * sms


def decode_splits(num_rows: int, num_kv_heads: int, max_keys: int, num_programs: int) -> int:
    """Programs per row and KV head for a decode step: one, unless rows x KV heads leave the GPU's
    `num_programs` slots idle and the longest row has keys to share (SPLIT_KEYS or more a split)."""
    idle_share = -(-num_programs // max(1, num_rows * num_kv_heads))
    return max(1, min(MAX_SPLITS, idle_share, max_keys // SPLIT_KEYS))


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """fp32 tiles stay fp32 in tl.dot (IEEE, no TF32: as torch). The interpreter's tl.dot multiplies
    bf16 tiles as their raw uint16 bits (triton 3.9), so there they go up to fp32 first (exact for
    q·k; p·v then skips the rounding of p to bf16 that the GPU does). fp16 keeps the GPU's code."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and INTERPRETED)


if HAVE_TRITON:

    @triton.jit
    def _attend_block(
        queries, keys, values, seen, scale, softcap, best, total, acc, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr
    ):
        """One block of keys folded into a running softmax (flash attention's update), shared by the
        row and tiled kernels: the queries' scores against `keys` (capped where SOFTCAP), those not
        `seen` masked out, then the running max `best`, denominator `total` and weighted values
        `acc` updated. A row that has seen no key yet pivots on 0, so its weights are exp(-inf) = 0,
        not NaN; elsewhere the pivot is the new max, as in the plain update."""
        if DOT_FP32:
            scores = tl.dot(queries.to(tl.float32), tl.trans(keys.to(tl.float32)), input_precision="ieee")
        else:
            scores = tl.dot(queries, tl.trans(keys))
        scores = scores * scale
        if SOFTCAP:  # tanh(x) = 2·sigmoid(2x) - 1: Triton has no tanh of its own on every backend
            scores = softcap * (2.0 * tl.sigmoid(2.0 * scores / softcap) - 1.0)
        scores = tl.where(seen, scores, float("-inf"))  # [rows, BLOCK_N]
        new_best = tl.maximum(best, tl.max(scores, axis=1))
        pivot = tl.where(new_best == float("-inf"), 0.0, new_best)
        weights = tl.exp(scores - pivot[:, None])
        rescale = tl.exp(best - pivot)
        total = total * rescale + tl.sum(weights, axis=1)
        if DOT_FP32:
            acc = acc * rescale[:, None] + tl.dot(weights, values.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * rescale[:, None] + tl.dot(weights.to(values.dtype), values)
        return new_best, total, acc

    @triton.jit
    def _row_attention_kernel(
        q, k, v, out, stats, partial, kv_start, kv_len, scale, softcap, window,
        group, head_dim,
        stride_q_row, stride_q_head, stride_kv_head, stride_kv_token, stride_o_row, stride_o_head,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_FP32: tl.constexpr,
        SOFTCAP: tl.constexpr, NUM_SPLITS: tl.constexpr,
    ):  # fmt: skip
        row, kv_head = tl.program_id(0), tl.program_id(1).to(tl.int64)  # heads x pool tokens x dim may pass 2^31
        start = tl.load(kv_start + row).to(tl.int64)
        length = tl.load(kv_len + row)
        g, d = tl.arange(0, BLOCK_G), tl.arange(0, BLOCK_D)
        in_group, in_dim = g < group, d < head_dim
        heads = kv_head * group + g
        queries = tl.load(
            q + row * stride_q_row + heads[:, None] * stride_q_head + d[None, :],
            mask=in_group[:, None] & in_dim[None, :],
            other=0.0,
        )  # [BLOCK_G, BLOCK_D]
        best = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)  # running max per head
        total = tl.zeros((BLOCK_G,), dtype=tl.float32)  # running softmax denominator
        acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
        pool = kv_head * stride_kv_head + start * stride_kv_token
        first = tl.maximum(length - window, 0)  # the sliding window's first key (0 without one)
        end = length
        if NUM_SPLITS > 1:  # this program's share of the keys, in whole blocks
            share = tl.cdiv(tl.cdiv(length - first, NUM_SPLITS), BLOCK_N) * BLOCK_N
            first = first + tl.program_id(2) * share
            end = tl.minimum(first + share, length)
        for n0 in range(first, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            in_keys = n < end
            offsets = pool + n[:, None] * stride_kv_token + d[None, :]
            kv_mask = in_keys[:, None] & in_dim[None, :]
            keys = tl.load(k + offsets, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            values = tl.load(v + offsets, mask=kv_mask, other=0.0)
            best, total, acc = _attend_block(
                queries, keys, values, in_keys[None, :], scale, softcap, best, total, acc, SOFTCAP, DOT_FP32
            )
        if NUM_SPLITS > 1:  # partials for _combine_splits_kernel, at [row, head, split]
            part = (row * group * tl.num_programs(1) + heads) * NUM_SPLITS + tl.program_id(2)
            tl.store(stats + part, best, mask=in_group)
            tl.store(stats + tl.num_programs(0) * group * tl.num_programs(1) * NUM_SPLITS + part, total, mask=in_group)
            tl.store(partial + part[:, None] * BLOCK_D + d[None, :], acc, mask=in_group[:, None])
        else:
            result = acc / tl.where(total > 0, total, 1.0)[:, None]  # a row with no keys (padding): zeros
            tl.store(
                out + row * stride_o_row + heads[:, None] * stride_o_head + d[None, :],
                result.to(out.dtype.element_ty),
                mask=in_group[:, None] & in_dim[None, :],
            )

    @triton.jit
    def _combine_splits_kernel(
        out, stats, partial, head_dim, stride_o_row, stride_o_head,
        NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        """One row and query head: the splits' partial softmaxes rescaled to their common max."""
        row, head = tl.program_id(0), tl.program_id(1)
        s, d = tl.arange(0, BLOCK_S), tl.arange(0, BLOCK_D)
        in_splits = s < NUM_SPLITS
        part = (row * tl.num_programs(1) + head) * NUM_SPLITS + s
        best = tl.load(stats + part, mask=in_splits, other=float("-inf"))
        total = tl.load(stats + tl.num_programs(0) * tl.num_programs(1) * NUM_SPLITS + part, mask=in_splits, other=0.0)
        acc = tl.load(partial + part[:, None] * BLOCK_D + d[None, :], mask=in_splits[:, None], other=0.0)
        overall = tl.max(best, axis=0)
        weights = tl.exp(best - tl.where(overall == float("-inf"), 0.0, overall))  # splits with no keys: 0
        denominator = tl.sum(weights * total, axis=0)
        result = tl.sum(weights[:, None] * acc, axis=0) / tl.where(denominator > 0, denominator, 1.0)
        tl.store(
            out + row * stride_o_row + head * stride_o_head + d, result.to(out.dtype.element_ty), mask=d < head_dim
        )

    # What triton.jit decided (it reads TRITON_INTERPRET, spelled as its version accepts it).
    INTERPRETED = not isinstance(_row_attention_kernel, triton.JITFunction)


def row_attention_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """`row_attention` row by row, softmax in float32: slow, obviously right."""
    num_rows, num_heads, _ = q.shape
    group = num_heads // k_pool.shape[0]
    out = torch.zeros_like(q)
    for t, (start, length) in enumerate(zip(kv_start.tolist(), kv_len.tolist())):
        if length == 0:
            continue
        if window is not None and length > window:  # keep the row's last `window` keys
            start, length = start + length - window, window
        keys = k_pool[:, start : start + length].float().repeat_interleave(group, 0)  # [H, L, D]
        values = v_pool[:, start : start + length].float().repeat_interleave(group, 0)
        scores = (keys @ q[t].float()[:, :, None]).squeeze(-1) * scale  # [H, L]
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        weights = torch.softmax(scores, dim=-1)
        out[t] = (weights[:, None, :] @ values).squeeze(1).to(q.dtype)
    return out
