"""KV cache: one token pool per layer; each sequence owns one contiguous extent of it.

Contiguous extents let attention read a sequence's keys as a view (measured ~10x faster on
CPU than gathering paged blocks each step). The pool is never copied whole: a sequence that
outgrows its extent grows in place when the next pages are free, else moves once to a run
twice its size (amortized O(1) per token); when no run is free the scheduler preempts.
"""
from __future__ import annotations

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

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity_tokens: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_pages = max(1, capacity_tokens // PAGE_TOKENS)
        self.capacity_tokens = self.num_pages * PAGE_TOKENS
        shape = (num_kv_heads, self.capacity_tokens, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.extents: dict[int, Extent] = {}  # seq id -> extent
        self.num_relocations = 0

    @property
    def num_reserved_tokens(self) -> int:
        return sum(e.num_pages for e in self.extents.values()) * PAGE_TOKENS

    def start(self, seq_id: int) -> int:
        """Token offset of the sequence's extent in the pool."""
        return self.extents[seq_id].start * PAGE_TOKENS

    def reserve(self, seq_id: int, num_tokens: int, num_filled: int) -> bool:
        """Make room for `num_tokens` in total, keeping the first `num_filled`; False if no room."""
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

    def free(self, seq_id: int) -> None:
        self.extents.pop(seq_id, None)

    def _sorted(self, ignore: int | None = None) -> list[Extent]:
        return sorted((e for i, e in self.extents.items() if i != ignore), key=lambda e: e.start)

    def _gap_after(self, extent: Extent) -> int:
        end = extent.start + extent.num_pages
        later = [e.start for e in self.extents.values() if e.start >= end]
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
            pool[:, dst:dst + num_tokens] = pool[:, src:src + num_tokens].clone()
        self.num_relocations += 1
