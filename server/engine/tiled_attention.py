"""Row attention for prompt chunks: one program per tile of a sequence's consecutive rows.

Same semantics as `row_attention` (row_attention.py, whose reference it is tested against): each
row t attends K/V[s : s + L] of its KV head, after its sliding window. What differs is the work:
the row kernel's program holds one row's query heads and streams that row's keys, so a prompt
chunk of T rows loads its keys T times. Here a program holds the query heads of up to
`rows_per_tile` consecutive rows of one sequence (one prompt chunk: the same extent, lengths
L, L + 1, ...), and every K/V block it loads serves all of them: the keys of a chunk are read
T / rows_per_tile times, and tl.dot gets a [rows x heads, D] tile instead of one padded row.

A tile's keys run from its first row's window start to its last row's length; each row masks what
it does not see (later keys, and keys before its own window). A row can then meet a block where
it sees nothing (before its window): its running max stays -inf there, and the update uses 0 in
its place, so the block adds nothing instead of NaN.

Steps with a prompt chunk use it for every row (a decode row is a tile of one); decode-only steps,
and the captured decode graphs, keep the row kernel.
"""

from __future__ import annotations

import torch

from .row_attention import HAVE_TRITON, NO_WINDOW, _dot_in_fp32

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .row_attention import _attend_block

BLOCK_N = 32  # keys per iteration
TILE_SLOTS = 64  # query rows x heads per program: a [64, D] tile for tl.dot


def rows_per_tile(group: int) -> int:
    """Sequence rows per program: as many as fit TILE_SLOTS with a row's `group` query heads."""
    return max(1, TILE_SLOTS // triton.next_power_of_2(group))


def prompt_tiles(chunks: list[tuple[int, int]], rows_per_tile: int, device) -> torch.Tensor:
    """[T, 2] int32 (first row, number of rows) of each tile, from each sequence's (first row,
    number of rows) in the step: a chunk's rows are consecutive positions of one extent."""
    tiles = [
        (first + offset, min(rows_per_tile, num_rows - offset))
        for first, num_rows in chunks
        for offset in range(0, num_rows, rows_per_tile)
    ]
    return torch.tensor(tiles, dtype=torch.int32, device=device)


def tiled_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    kv_start: torch.Tensor,
    kv_len: torch.Tensor,
    tiles: torch.Tensor,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """`row_attention` over the rows of `tiles` ([T, 2] int32 from `prompt_tiles`, covering every
    row once); q [N, H, D] with a unit last stride; returns [N, H, D] in q's dtype."""
    if q.stride(2) != 1:
        q = q.contiguous()
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[0]
    group = num_heads // num_kv_heads
    out = torch.empty(num_rows, num_heads, head_dim, dtype=q.dtype, device=q.device)
    if num_rows == 0:
        return out
    block_g = triton.next_power_of_2(group)
    _tiled_attention_kernel[(tiles.shape[0], num_kv_heads)](
        q, k_pool, v_pool, out, kv_start, kv_len, tiles, scale, softcap or 1.0, window or NO_WINDOW,
        group, head_dim,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=rows_per_tile(group), BLOCK_G=block_g,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_N=BLOCK_N,
        DOT_FP32=_dot_in_fp32(q.dtype), SOFTCAP=softcap is not None,
    )  # fmt: skip
    return out


if HAVE_TRITON:

    @triton.jit
    def _tiled_attention_kernel(
        q, k, v, out, kv_start, kv_len, tiles, scale, softcap, window,
        group, head_dim,
        stride_q_row, stride_q_head, stride_kv_head, stride_kv_token, stride_o_row, stride_o_head,
        BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        DOT_FP32: tl.constexpr, SOFTCAP: tl.constexpr,
    ):  # fmt: skip
        tile, kv_head = tl.program_id(0), tl.program_id(1).to(tl.int64)
        first_row, num_rows = tl.load(tiles + 2 * tile), tl.load(tiles + 2 * tile + 1)
        slot = tl.arange(0, BLOCK_M * BLOCK_G)  # one (row, query head) per slot
        in_tile, g = slot // BLOCK_G, slot % BLOCK_G
        valid = (in_tile < num_rows) & (g < group)
        rows = (first_row + in_tile).to(tl.int64)
        heads = kv_head * group + g
        d = tl.arange(0, BLOCK_D)
        in_dim = d < head_dim
        lengths = tl.load(kv_len + rows, mask=valid, other=0)  # [M]
        lowers = tl.maximum(lengths - window, 0)  # each row's window start
        queries = tl.load(
            q + rows[:, None] * stride_q_row + heads[:, None] * stride_q_head + d[None, :],
            mask=valid[:, None] & in_dim[None, :],
            other=0.0,
        )  # [M, BLOCK_D]
        start = tl.load(kv_start + first_row).to(tl.int64)
        first = tl.maximum(tl.load(kv_len + first_row) - window, 0)  # the tile's earliest key
        last = tl.load(kv_len + first_row + num_rows - 1)  # its last row's length: the most keys
        best = tl.full((BLOCK_M * BLOCK_G,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_M * BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M * BLOCK_G, BLOCK_D), dtype=tl.float32)
        pool = kv_head * stride_kv_head + start * stride_kv_token
        for n0 in range(first, last, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            offsets = pool + n[:, None] * stride_kv_token + d[None, :]
            kv_mask = (n < last)[:, None] & in_dim[None, :]
            keys = tl.load(k + offsets, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
            values = tl.load(v + offsets, mask=kv_mask, other=0.0)
            seen = (n[None, :] < lengths[:, None]) & (n[None, :] >= lowers[:, None])  # causal and windowed
            best, total, acc = _attend_block(
                queries, keys, values, seen, scale, softcap, best, total, acc, SOFTCAP, DOT_FP32
            )
        result = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(
            out + rows[:, None] * stride_o_row + heads[:, None] * stride_o_head + d[None, :],
            result.to(out.dtype.element_ty),
            mask=valid[:, None] & in_dim[None, :],
        )
