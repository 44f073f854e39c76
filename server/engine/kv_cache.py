"""KV cache: one token pool per layer; each sequence owns one contiguous extent of it.

Contiguous extents let attention read a sequence's keys as a view (measured ~10x faster on
CPU than gathering paged blocks each step). The pool is never copied whole: a sequence that
outgrows its extent grows in place when the next pages are free, else moves once to a run
twice its size (amortized O(1) per token); when no run is free the scheduler preempts.

Prefix caching keeps blocks of a sequence that left as *cached blocks*: pages no sequence holds
but the prefix index (prefix_cache.py) can still copy from. They count against the same budget,
and `reserve` evicts them, least recently used first, before it reports no room, so a running
sequence is never preempted while cached blocks could make room instead.

A layer with a sliding window still keeps every token of a sequence, not just its window's: one
extent serves every layer at the same offsets (a token's K/V is written at one pool position for
all layers), and prefix-cache blocks and recomputes stay whole-sequence. The window is read-side
only (attention starts each row at its window, attention.py); what this costs in memory, and what
a per-layer rolling pool would save, is in docs/models.md#sliding-windows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

PAGE_TOKENS = 16  # allocation granularity
HEADROOM_PAGES = 4  # extra pages a new extent takes when free, so early decode steps grow in place


@dataclass
class Extent:
    start: int  # first page
    num_pages: int


class KVCache:
    """k[layer], v[layer]: [kv_heads, capacity, head_dim] pools plus an extent allocator."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        block_size: int = PAGE_TOKENS,
        scratch_page: bool = False,
        windows: Sequence[int | None] | None = None,
    ):
        """`windows`: each layer's sliding window in keys (None: it sees every earlier key); what
        attention reads of a layer's pool. Every layer keeps every token of a sequence either way."""
        if block_size % PAGE_TOKENS:
            raise ValueError(f"block_size must be a multiple of {PAGE_TOKENS}, not {block_size}")
        self.block_size, self.block_pages = block_size, block_size // PAGE_TOKENS
        self.num_pages = max(1, capacity_tokens // PAGE_TOKENS)
        self.capacity_tokens = self.num_pages * PAGE_TOKENS
        # A page no sequence gets: captured decode graphs write their padding rows' K/V there.
        self.scratch_token = self.capacity_tokens if scratch_page else None
        shape = (num_kv_heads, self.capacity_tokens + (PAGE_TOKENS if scratch_page else 0), head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.windows = tuple(windows) if windows is not None else (None,) * num_layers
        assert len(self.windows) == num_layers, "one window (or None) per layer"
        self.extents: dict[int, Extent] = {}  # seq id -> extent
        self.cached: OrderedDict[int, None] = OrderedDict()  # first page of each cached block, LRU first
        self.on_evict: Callable[[int], None] = lambda page: None  # told each cached block dropped
        self.num_relocations = self.num_evicted_blocks = 0

    @property
    def num_reserved_tokens(self) -> int:
        """Tokens of extents that sequences hold (in use)."""
        return sum(e.num_pages for e in self.extents.values()) * PAGE_TOKENS

    @property
    def num_cached_tokens(self) -> int:
        """Tokens of cached blocks no sequence holds: reusable, and free for the taking."""
        return len(self.cached) * self.block_size

    def start(self, seq_id: int) -> int:
        """Token offset of the sequence's extent in the pool."""
        return self.extents[seq_id].start * PAGE_TOKENS

    def reserve(self, seq_id: int, num_tokens: int, num_filled: int, keep: Collection[int] = ()) -> bool:
        """Make room for `num_tokens` in total, keeping the first `num_filled`; False if no room even
        once every cached block (except those starting at a page in `keep`) is evicted."""
        if self._reserve(seq_id, num_tokens, num_filled):
            return True
        num_evict = self._shortfall_blocks(seq_id, num_tokens)
        while self._evict(num_evict, keep):
            if self._reserve(seq_id, num_tokens, num_filled):
                return True
            num_evict *= 2  # fragmentation: evicting just the shortfall did not free a run
        return False

    def free(self, seq_id: int, keep_blocks: Collection[int] = ()) -> list[int]:
        """Give the extent back, except its blocks at indices `keep_blocks`, which become cached
        blocks; returns their first pages, in the order given."""
        extent = self.extents.pop(seq_id, None)
        if extent is None:
            return []
        pages = [extent.start + i * self.block_pages for i in keep_blocks]
        assert all(page + self.block_pages <= extent.start + extent.num_pages for page in pages)
        for page in reversed(pages):  # a prefix's last block is evicted first: it is useless without the first
            self.cached[page] = None
        return pages

    def touch(self, pages: list[int]) -> None:
        """Mark cached blocks (a prefix's, first to last) as just used."""
        for page in reversed(pages):
            self.cached.move_to_end(page)

    def copy_blocks(self, sources: list[int], dst: int) -> None:
        """Copy whole blocks starting at token offsets `sources` to consecutive tokens from `dst`;
        blocks that are adjacent in the pool go as one run per layer."""
        runs: list[list[int]] = []  # [source, length]
        for src in sources:
            if runs and runs[-1][0] + runs[-1][1] == src:
                runs[-1][1] += self.block_size
            else:
                runs.append([src, self.block_size])
        for pool in (*self.k, *self.v):
            offset = dst
            for src, length in runs:
                pool[:, offset : offset + length].copy_(pool[:, src : src + length])
                offset += length

    def _shortfall_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Cached blocks to evict first, at least: what the free pages lack (its own extent counts)."""
        extent = self.extents.get(seq_id)
        held = sum(e.num_pages for e in self.extents.values()) - (extent.num_pages if extent else 0)
        free = self.num_pages - held - len(self.cached) * self.block_pages
        return max(1, -(-(-(-num_tokens // PAGE_TOKENS) - free) // self.block_pages))

    def _evict(self, count: int, keep: Collection[int]) -> bool:
        victims = [page for page in self.cached if page not in keep][:count]
        for page in victims:
            del self.cached[page]
            self.on_evict(page)
        self.num_evicted_blocks += len(victims)
        return bool(victims)

    def _reserve(self, seq_id: int, num_tokens: int, num_filled: int) -> bool:
        need = -(-num_tokens // PAGE_TOKENS)
        extent = self.extents.get(seq_id)
        if extent is not None and extent.num_pages >= need:
            return True
        if extent is not None and self._gap_after(extent) >= need - extent.num_pages:
            extent.num_pages = need  # grow in place
            return True
        wanted = need + HEADROOM_PAGES if extent is None else max(need, 2 * extent.num_pages)
        start = self._find_run(wanted, need, ignore=seq_id)  # its own extent counts as free: moves overlap safely
        if start is None:
            return False
        if extent is not None and num_filled:
            self._move(extent.start * PAGE_TOKENS, start[0] * PAGE_TOKENS, num_filled)
        self.extents[seq_id] = Extent(*start)
        return True

    def _sorted(self, ignore: int | None = None) -> list[Extent]:
        held = [e for i, e in self.extents.items() if i != ignore]
        return sorted(held + [Extent(page, self.block_pages) for page in self.cached], key=lambda e: e.start)

    def _gap_after(self, extent: Extent) -> int:
        end = extent.start + extent.num_pages
        later = [e.start for e in self.extents.values() if e.start >= end] + [p for p in self.cached if p >= end]
        return (min(later) if later else self.num_pages) - end

    def _find_run(self, wanted: int, minimum: int, ignore: int) -> tuple[int, int] | None:
        """First free run of `wanted` pages (or the largest run >= `minimum`): (start, pages)."""
        best, cursor = None, 0
        for extent in self._sorted(ignore) + [Extent(self.num_pages, 0)]:
            gap = extent.start - cursor
            if gap >= wanted:
                return cursor, wanted
            if gap >= minimum and (best is None or gap > best[1]):
                best = (cursor, gap)
            cursor = max(cursor, extent.start + extent.num_pages)
        return best

    def _move(self, src: int, dst: int, num_tokens: int) -> None:
        for pool in (*self.k, *self.v):
            pool[:, dst : dst + num_tokens] = pool[:, src : src + num_tokens].clone()
        self.num_relocations += 1
