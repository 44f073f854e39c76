"""The KV pool's extent allocator: grow in place, relocate with the data, free, refuse when full."""

from __future__ import annotations

import torch

from server.engine.kv_cache import HEADROOM_PAGES, PAGE_TOKENS, KVCache

NUM_LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 4


def make_cache(num_pages: int) -> KVCache:
    return KVCache(
        num_layers=NUM_LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, capacity_tokens=num_pages * PAGE_TOKENS
    )


def write(cache: KVCache, seq_id: int, num_tokens: int) -> list[torch.Tensor]:
    """Fill the sequence's first tokens with distinct values; returns what was written, per pool."""
    start = cache.start(seq_id)
    written = []
    for i, pool in enumerate((*cache.k, *cache.v)):
        values = torch.randn(KV_HEADS, num_tokens, HEAD_DIM) + 10 * (i + 1)
        pool[:, start : start + num_tokens] = values
        written.append(values)
    return written


def read(cache: KVCache, seq_id: int, num_tokens: int) -> list[torch.Tensor]:
    start = cache.start(seq_id)
    return [pool[:, start : start + num_tokens].clone() for pool in (*cache.k, *cache.v)]


def assert_same(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert torch.equal(a, e)


def test_reserve_takes_headroom_and_grows_in_place():
    cache = make_cache(16)
    assert cache.reserve(0, 20, 0)  # 2 pages, plus headroom
    assert (cache.start(0), cache.extents[0].num_pages) == (0, 2 + HEADROOM_PAGES)
    assert cache.reserve(0, (2 + HEADROOM_PAGES) * PAGE_TOKENS, 20)  # still fits: nothing changes
    assert cache.extents[0].num_pages == 2 + HEADROOM_PAGES
    written = write(cache, 0, 20)

    assert cache.reserve(0, 10 * PAGE_TOKENS + 1, 20)  # the next pages are free: grow in place
    assert (cache.start(0), cache.extents[0].num_pages) == (0, 11)
    assert cache.num_relocations == 0
    assert cache.num_reserved_tokens == 11 * PAGE_TOKENS
    assert_same(read(cache, 0, 20), written)


def test_relocation_keeps_written_values():
    cache = make_cache(16)
    assert cache.reserve(0, PAGE_TOKENS, 0)  # pages 0-4
    assert cache.reserve(1, PAGE_TOKENS, 0)  # pages 5-9: blocks seq 0 from growing in place
    assert cache.start(1) == 5 * PAGE_TOKENS
    written = write(cache, 0, PAGE_TOKENS)
    neighbour = write(cache, 1, PAGE_TOKENS)

    assert cache.reserve(0, 6 * PAGE_TOKENS, PAGE_TOKENS)
    assert cache.num_relocations == 1
    assert cache.start(0) == 10 * PAGE_TOKENS  # the only run of 6 free pages
    assert cache.extents[0].num_pages == 6
    assert_same(read(cache, 0, PAGE_TOKENS), written)
    assert_same(read(cache, 1, PAGE_TOKENS), neighbour)  # the move did not touch its neighbour


def test_free_returns_pages_for_reuse():
    cache = make_cache(8)
    assert cache.reserve(0, 8 * PAGE_TOKENS, 0)
    assert not cache.reserve(1, 1, 0)
    cache.free(0)
    cache.free(0)  # freeing twice is harmless
    assert cache.num_reserved_tokens == 0
    assert cache.reserve(1, 8 * PAGE_TOKENS, 0)
    assert cache.start(1) == 0


def test_exhausted_capacity_returns_false_and_changes_nothing():
    cache = make_cache(4)
    assert cache.reserve(0, 2 * PAGE_TOKENS, 0)
    assert cache.extents[0].num_pages == 4  # headroom clipped to what is free
    assert not cache.reserve(1, 1, 0)
    assert 1 not in cache.extents
    assert not cache.reserve(0, 4 * PAGE_TOKENS + 1, 2 * PAGE_TOKENS)  # past the whole pool
    assert (cache.start(0), cache.extents[0].num_pages) == (0, 4)
    assert cache.num_reserved_tokens == 4 * PAGE_TOKENS


def test_lone_sequence_in_the_middle_grows_to_whole_capacity():
    cache = make_cache(8)
    assert cache.reserve(0, PAGE_TOKENS, 0)  # pages 0-4
    assert cache.reserve(1, PAGE_TOKENS, 0)  # pages 5-7: all that is left
    assert (cache.start(1), cache.extents[1].num_pages) == (5 * PAGE_TOKENS, 3)
    cache.free(0)
    written = write(cache, 1, 3 * PAGE_TOKENS)

    # Neither the 5 pages before it nor the 0 after are enough alone; with its own 3 they are.
    assert cache.reserve(1, cache.capacity_tokens, 3 * PAGE_TOKENS)
    assert (cache.start(1), cache.extents[1].num_pages) == (0, 8)
    assert_same(read(cache, 1, 3 * PAGE_TOKENS), written)


def test_relocation_onto_an_overlapping_run_keeps_values():
    cache = make_cache(6)
    assert cache.reserve(0, PAGE_TOKENS, 0)  # pages 0-4
    assert cache.reserve(1, PAGE_TOKENS, 0)  # page 5
    cache.free(0)
    assert cache.reserve(1, 2 * PAGE_TOKENS, PAGE_TOKENS)  # moves to pages 0-1
    assert cache.reserve(2, PAGE_TOKENS, 0)  # pages 2-5
    cache.free(1)
    assert (cache.start(2), cache.extents[2].num_pages) == (2 * PAGE_TOKENS, 4)
    written = write(cache, 2, 4 * PAGE_TOKENS)

    # The only 6-page run starts at 0 and covers its own pages 2-5: source and target overlap.
    assert cache.reserve(2, 6 * PAGE_TOKENS, 4 * PAGE_TOKENS)
    assert (cache.start(2), cache.extents[2].num_pages) == (0, 6)
    assert_same(read(cache, 2, 4 * PAGE_TOKENS), written)


def test_cached_blocks_are_evicted_last_block_first_and_spared_when_kept():
    cache = make_cache(8)
    assert cache.reserve(0, 64, 0)  # 4 pages + headroom: the whole pool
    evicted = []
    cache.on_evict = evicted.append
    assert cache.free(0, [0, 1, 2]) == [0, 1, 2]
    assert cache.num_reserved_tokens == 0 and cache.num_cached_tokens == 3 * PAGE_TOKENS
    assert cache.reserve(1, 6 * PAGE_TOKENS, 0, keep=[0])  # 5 pages are free: block 2 goes (a prefix's tail), not 0
    assert evicted == [2] and list(cache.cached) == [1, 0]
    cache.touch([1])
    assert not cache.reserve(2, 3 * PAGE_TOKENS, 0, keep=[0, 1])
    assert cache.reserve(2, 2 * PAGE_TOKENS, 0)
    assert evicted == [2, 0, 1] and not cache.cached
