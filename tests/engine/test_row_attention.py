"""The row attention kernels against their torch reference (row_attention.py's kernel, its
split-decode variant, and tiled_attention.py's prompt tiles, with windows and softcaps), and the
reference against SDPA; in Triton's interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from server.engine.row_attention import (
    BLOCK_N,
    MAX_SPLITS,
    SPLIT_KEYS,
    decode_splits,
    row_attention,
    row_attention_reference,
)
from server.engine.tiled_attention import prompt_tiles, rows_per_tile, tiled_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POOL = 320


def rows_of(*pairs: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    starts, lengths = zip(*pairs)
    as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return as_int32(starts), as_int32(lengths)


# Three prompt rows of one sequence (causal lengths 1..3), a padding row, a decode row whose keys span
# several BLOCK_N blocks, one of a single key, and one ending at the pool's end.
ROWS = [(0, 1), (0, 2), (0, 3), (0, 0), (40, 3 * BLOCK_N + 5), (200, 1), (POOL - 70, 70)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 4, 16), (6, 2, 24), (8, 2, 64)])
def test_row_attention_equals_its_reference(dtype, heads, kv_heads, head_dim):
    gen = torch.Generator().manual_seed(heads * head_dim)
    k_pool, v_pool = (torch.randn(kv_heads, POOL, head_dim, generator=gen).to(DEVICE, dtype) for _ in range(2))
    q = torch.randn(len(ROWS), heads, head_dim, generator=gen).to(DEVICE, dtype)
    starts, lengths = rows_of(*ROWS)
    scale = head_dim**-0.5
    got = row_attention(q, k_pool, v_pool, starts, lengths, scale)
    expected = row_attention_reference(q, k_pool, v_pool, starts, lengths, scale)
    # An output is a convex mix of values, so its error scales with max |v|: the kernel rounds the
    # weights to the half dtype for p·v (eps/2 each), the output once more (eps/2), and sums in another
    # order; measured at most ~1.1 eps·max|v| in every dtype, hence 4.
    atol = 4 * torch.finfo(dtype).eps * v_pool.abs().max().item()
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert not got[3].any()  # the padding row (no keys) is zeros


@pytest.mark.parametrize("softcap", [2.0, 50.0])
def test_a_logit_softcap_equals_its_reference(softcap):
    """Gemma 2's cap (scores -> softcap·tanh(scores / softcap)); 2 bends almost every score, 50 few.
    The kernel's tanh is 2·sigmoid(2x) - 1, off torch.tanh by ~eps, so a capped score is off by
    ~eps·softcap: measured 0.5 eps·max|v| at a cap of 2, 6 at 50; the bound grows with the cap."""
    gen = torch.Generator().manual_seed(7)
    k_pool, v_pool = (torch.randn(2, POOL, 16, generator=gen).to(DEVICE) for _ in range(2))
    q = 3 * torch.randn(len(ROWS), 4, 16, generator=gen).to(DEVICE)  # scores of several units: the cap bites
    starts, lengths = rows_of(*ROWS)
    got = row_attention(q, k_pool, v_pool, starts, lengths, 0.25, softcap)
    expected = row_attention_reference(q, k_pool, v_pool, starts, lengths, 0.25, softcap)
    uncapped = row_attention_reference(q, k_pool, v_pool, starts, lengths, 0.25)
    assert (expected - uncapped).abs().max() > 1e-3, "the cap must change the output, or the test proves nothing"
    atol = 4 * torch.finfo(torch.float32).eps * v_pool.abs().max().item() * max(1.0, softcap / 4)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_a_strided_query_reads_the_same():
    """The engine passes q as a transposed view of the projection's output."""
    k_pool, v_pool = torch.randn(2, POOL, 16, device=DEVICE), torch.randn(2, POOL, 16, device=DEVICE)
    q = torch.randn(4, len(ROWS), 16, device=DEVICE).transpose(0, 1)  # [N, H, D], not contiguous
    starts, lengths = rows_of(*ROWS)
    assert torch.equal(
        row_attention(q, k_pool, v_pool, starts, lengths, 0.25),
        row_attention(q.contiguous(), k_pool, v_pool, starts, lengths, 0.25),
    )


def test_the_reference_is_causal_sdpa_with_grouped_heads():
    k_pool, v_pool = torch.randn(2, POOL, 16), torch.randn(2, POOL, 16)
    q = torch.randn(5, 6, 16)  # five prompt rows of one sequence starting at pool token 30
    starts, lengths = torch.full((5,), 30, dtype=torch.int32), torch.arange(1, 6, dtype=torch.int32)
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_pool[None, :, 30:35], v_pool[None, :, 30:35], is_causal=True, enable_gqa=True
    )[0].transpose(0, 1)
    got = row_attention_reference(q, k_pool, v_pool, starts, lengths, 16**-0.5)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("window", [1, 4, BLOCK_N + 3])
def test_a_sliding_window_equals_its_reference(window):
    """A window keeps each row's last `window` keys: rows shorter than it see all theirs, longer
    ones start mid-block (window + 3 > BLOCK_N: the first block is partial, the rest whole)."""
    gen = torch.Generator().manual_seed(window)
    k_pool, v_pool = (torch.randn(2, POOL, 16, generator=gen).to(DEVICE) for _ in range(2))
    q = torch.randn(len(ROWS), 4, 16, generator=gen).to(DEVICE)
    starts, lengths = rows_of(*ROWS)
    got = row_attention(q, k_pool, v_pool, starts, lengths, 0.25, window=window)
    expected = row_attention_reference(q, k_pool, v_pool, starts, lengths, 0.25, window=window)
    unwindowed = row_attention_reference(q, k_pool, v_pool, starts, lengths, 0.25)
    assert (expected - unwindowed).abs().amax(dim=(1, 2)).gt(1e-3).sum() >= 2, "the window must bite"
    torch.testing.assert_close(
        got, expected, atol=4 * torch.finfo(torch.float32).eps * v_pool.abs().max().item(), rtol=0
    )
    assert not got[3].any()


def test_the_windowed_reference_is_sdpa_with_transformers_sliding_mask():
    """The reference's window is transformers' own rule (masking_utils), keys kv > q - window."""
    from transformers.masking_utils import sliding_window_causal_mask_function

    k_pool, v_pool = torch.randn(2, POOL, 16), torch.randn(2, POOL, 16)
    q = torch.randn(9, 6, 16)  # nine prompt rows of one sequence starting at pool token 30
    starts, lengths = torch.full((9,), 30, dtype=torch.int32), torch.arange(1, 10, dtype=torch.int32)
    rule = sliding_window_causal_mask_function(3)
    positions = torch.arange(9)
    mask = rule(0, 0, positions[:, None], positions[None, :])  # [9, 9]
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k_pool[None, :, 30:39], v_pool[None, :, 30:39], attn_mask=mask, enable_gqa=True
    )[0].transpose(0, 1)
    got = row_attention_reference(q, k_pool, v_pool, starts, lengths, 16**-0.5, window=3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


# Tiled prompt rows (tiled_attention.py): a 37-row prompt chunk from position 5 (tiles of several
# rows, the last one partial), a whole 3-token prompt, two decode rows (tiles of one).
CHUNKS = [(0, 37), (37, 3), (40, 1), (41, 1)]
TILED_ROWS = [(40, 6 + i) for i in range(37)] + [(0, 1), (0, 2), (0, 3), (200, 1), (POOL - 70, 70)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (6, 2)])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (4, None), (BLOCK_N + 3, 2.0)])
def test_tiled_prompt_rows_equal_the_reference(dtype, heads, kv_heads, window, softcap):
    """Windows start rows of one tile in different key blocks (some see nothing in the tile's first)."""
    gen = torch.Generator().manual_seed(heads + (window or 0))
    k_pool, v_pool = (torch.randn(kv_heads, POOL, 16, generator=gen).to(DEVICE, dtype) for _ in range(2))
    q = torch.randn(len(TILED_ROWS), heads, 16, generator=gen).to(DEVICE, dtype)
    starts, lengths = rows_of(*TILED_ROWS)
    tiles = prompt_tiles(CHUNKS, rows_per_tile(heads // kv_heads), DEVICE)
    assert tiles.shape[0] < len(TILED_ROWS) and int(tiles[:, 1].max()) > 1
    got = tiled_attention(q, k_pool, v_pool, starts, lengths, tiles, 0.25, softcap, window)
    expected = row_attention_reference(q, k_pool, v_pool, starts, lengths, 0.25, softcap, window)
    atol = 4 * torch.finfo(dtype).eps * v_pool.abs().max().item() * max(1.0, (softcap or 0) / 4)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


# Long-context decode split over the key range (row_attention's num_splits)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_splits", "window", "softcap"), [(2, None, None), (3, 40, None), (5, None, 2.0), (16, None, None)]
)
def test_decode_split_over_the_key_range_equals_the_reference(dtype, num_splits, window, softcap):
    """Shares of whole blocks: with 16 splits most rows leave some splits without keys (the padding
    row leaves all), which the combine must weigh as nothing."""
    gen = torch.Generator().manual_seed(num_splits)
    k_pool, v_pool = (torch.randn(2, POOL, 16, generator=gen).to(DEVICE, dtype) for _ in range(2))
    q = 3 * torch.randn(len(ROWS), 8, 16, generator=gen).to(DEVICE, dtype)
    starts, lengths = rows_of(*ROWS)
    got = row_attention(q, k_pool, v_pool, starts, lengths, 0.25, softcap, window, num_splits=num_splits)
    expected = row_attention_reference(q, k_pool, v_pool, starts, lengths, 0.25, softcap, window)
    atol = 4 * torch.finfo(dtype).eps * v_pool.abs().max().item() * max(1.0, (softcap or 0) / 4)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert not got[3].any()


def test_decode_splits_fill_idle_programs_only_for_long_rows():
    assert decode_splits(num_rows=1, num_kv_heads=8, max_keys=32768, num_programs=264) == MAX_SPLITS
    assert decode_splits(num_rows=1, num_kv_heads=8, max_keys=3 * SPLIT_KEYS, num_programs=264) == 3
    assert decode_splits(num_rows=64, num_kv_heads=8, max_keys=32768, num_programs=264) == 1  # the GPU is full
    assert decode_splits(num_rows=1, num_kv_heads=8, max_keys=SPLIT_KEYS - 1, num_programs=264) == 1
    assert decode_splits(num_rows=4, num_kv_heads=8, max_keys=32768, num_programs=264) == 9
