"""The host memory settings a long-running server needs: few glibc arenas, freed memory handed back
to the system once the engine goes idle, and huge pages under large tensors (`allocate_on_huge_pages`).

Why: glibc gives every thread that allocates its own arena (up to 8 per core) and keeps the blocks
freed in each for reuse. A server's threads (the engine, the event loop, executors loading adapters,
the tokenizer) each free megabytes of temporaries into their own arena, so after a burst the RSS
stays high and steps up whenever a new thread first allocates: the soak test saw one replica stay
188 MB higher after 60 s of traffic with nothing live. Two arenas bound that spread, and a trim
after a second of idleness returns what the burst freed. Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h
_name = ctypes.util.find_library("c")
_LIBC = ctypes.CDLL(_name) if _name else None
_GLIBC = _LIBC is not None and hasattr(_LIBC, "mallopt") and hasattr(_LIBC, "malloc_trim")


def limit_arenas(arenas: int = 2) -> None:
    """Cap the allocator's arenas, unless the operator set MALLOC_ARENA_MAX (glibc reads that
    itself). Call it before the server starts its threads: a thread keeps the arena it first got."""
    if _GLIBC and "MALLOC_ARENA_MAX" not in os.environ:
        _LIBC.mallopt(_M_ARENA_MAX, arenas)


def give_back() -> None:
    """Return the free pages of every arena to the system (a few ms on a 2 GB server)."""
    if _GLIBC:
        _LIBC.malloc_trim(0)


def allocate_on_huge_pages() -> None:
    """Have torch's CPU allocator advise transparent huge pages for every tensor of 2 MB or more it
    allocates (its THP_MEM_ALLOC_ENABLE), unless the operator set that variable: the kernels' packed
    weight copies, merge buffers and the KV pool, streamed like the weights (adapters/huge_pages.py says
    why). Call it before the process allocates its first such tensor: torch reads the variable then,
    once."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
