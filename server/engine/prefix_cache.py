"""Automatic prefix caching: full blocks of a prompt's K/V, found again by a chain of hashes.

A prompt's block i is named sha256(name of block i-1, its tokens); block 0's parent is the root,
sha256(adapter identity, cache salt). A hit therefore needs the same tokens from the very first one,
under an adapter with the same weights and config (`adapters/identity.py`: a digest of content,
never a name) and the same `cache_salt`. The identity is a fixed-length field ahead of the salt,
so no salt, name or other request field can spell another adapter's root.

Copy on hit: each sequence keeps one contiguous extent, so attention reads its keys as a view, and
a hit copies the cached blocks into the new sequence's extent: a memcpy against the forward pass
it replaces (`benchmarks/prefix_cache.py` measures both, and the gather that block tables would
add to every step). A block is findable once computed: in the extent of the running sequence that
computed it, then, after that sequence leaves, as a cached block of the pool (kv_cache.py), until
evicted. Only prompt blocks are indexed; a request that scores its prompt (prompt_logprobs) needs
every prompt row's logits, so it computes them all and never looks up.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .kv_cache import PAGE_TOKENS, KVCache
from .sequence import Sequence

_ROOT_DOMAIN = b"loraserve/prefix/v1\0"


@dataclass(frozen=True)
class _Where:
    """Where a block's K/V are: block `at` of a running sequence's extent, or (seq_id None) the
    cached block whose first page is `at`."""

    seq_id: int | None
    at: int


class PrefixCache:
    """Hash -> block index over the KV pool; the scheduler asks it at admission and on release."""

    def __init__(self, cache: KVCache, *, enabled: bool = True):
        self.cache, self.enabled, self.block_size = cache, enabled, cache.block_size
        self._where: dict[bytes, _Where] = {}
        self._page_hash: dict[int, bytes] = {}  # cached block's first page -> its hash
        self._owned: dict[int, list[tuple[int, bytes]]] = {}  # seq id -> (block index, hash) it made findable
        self.num_queries = self.num_hits = 0  # tokens looked up, tokens found (vLLM's counters)
        cache.on_evict = self._forget_page

    def hash_blocks(self, identity: bytes, salt: str | None, token_ids: list[int]) -> list[bytes]:
        """The chain of names of the prompt's full blocks (empty when caching is off)."""
        if not self.enabled:
            return []
        salted = b"\0" if salt is None else b"\1" + salt.encode()
        parent = hashlib.sha256(_ROOT_DOMAIN + identity + salted).digest()
        names, size = [], self.block_size
        for start in range(0, len(token_ids) - size + 1, size):
            parent = hashlib.sha256(parent + struct.pack(f"<{size}q", *token_ids[start : start + size])).digest()
            names.append(parent)
        return names

    def match(self, seq: Sequence) -> list[_Where]:
        """The longest run of the sequence's first blocks that is cached, leaving at least its last
        token to compute (it yields the logits to sample from)."""
        if not self._looks_up(seq):
            return []
        hits = []
        for name in seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]:
            where = self._where.get(name)
            if where is None:
                break
            hits.append(where)
        return hits

    @staticmethod
    def pages(hits: list[_Where]) -> list[int]:
        """First pages of the cached blocks among `hits`: eviction must spare them until `load`."""
        return [w.at for w in hits if w.seq_id is None]

    def load(self, seq: Sequence, hits: list[_Where]) -> int:
        """Copy `hits` into the start of the sequence's (reserved) extent; returns the tokens now in it."""
        num_cached = len(hits) * self.block_size
        seq.num_indexed_blocks = len(hits)
        if self._looks_up(seq):
            self.num_queries += seq.num_tokens
            self.num_hits += num_cached
            seq.prefix_cache_queries += seq.num_tokens
            seq.prefix_cache_hits += num_cached
        if hits:
            self.cache.copy_blocks([self._offset(w) for w in hits], self.cache.start(seq.seq_id))
            self.cache.touch(self.pages(hits))
        return num_cached

    def register(self, seq: Sequence) -> None:
        """After a step: the sequence's newly computed full prompt blocks become findable."""
        num_full = min(len(seq.block_hashes), seq.num_computed // self.block_size)
        owned = self._owned.setdefault(seq.seq_id, []) if num_full > seq.num_indexed_blocks else None
        for i in range(seq.num_indexed_blocks, num_full):
            name = seq.block_hashes[i]
            if name not in self._where:  # else an equal block is findable already
                self._where[name] = _Where(seq.seq_id, i)
                owned.append((i, name))
        seq.num_indexed_blocks = max(seq.num_indexed_blocks, num_full)

    def release(self, seq: Sequence) -> None:
        """The sequence leaves (finished, aborted or preempted): free its extent, but keep the blocks
        it made findable as cached blocks."""
        owned = self._owned.pop(seq.seq_id, [])
        pages = self.cache.free(seq.seq_id, [i for i, _ in owned])
        for (_, name), page in zip(owned, pages):
            self._where[name] = _Where(None, page)
            self._page_hash[page] = name
        seq.num_indexed_blocks = 0

    @property
    def num_indexed_blocks(self) -> int:
        return len(self._where)

    def _looks_up(self, seq: Sequence) -> bool:
        return self.enabled and seq.params.prompt_logprobs is None

    def _offset(self, where: _Where) -> int:
        if where.seq_id is None:
            return where.at * PAGE_TOKENS
        return self.cache.start(where.seq_id) + where.at * self.block_size

    def _forget_page(self, page: int) -> None:
        del self._where[self._page_hash.pop(page)]
