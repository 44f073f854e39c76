"""Worker threads, split by who may wait: serving work never queues behind adapter analysis.

Serving work (tokenizing, chat templates, grammar compiles, store reads, adapter parses) runs on the
event loop's default executor, sized by `serving_workers`. Analysis (float64 SVDs of whole adapters,
seconds each) runs on its own `analysis_workers` threads with at most `max_queued_analyses` waiting;
past that a request gets 429 with Retry-After instead of a place in an unbounded queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.engine.torch_threads import TransientThreads

from .errors import HTTPError

T = TypeVar("T")
RETRY_AFTER_S = 5


class AnalysisPool:
    """A bounded pool for analysis: `workers` threads, `max_queued` waiting, the rest refused."""

    def __init__(self, workers: int, max_queued: int):
        self._executor = TransientThreads(workers, "analysis")  # SVDs are torch work: see torch_threads.py
        self._capacity = workers + max_queued
        self._admitted = 0
        self._lock = threading.Lock()

    async def run(self, fn: Callable[..., T], *args) -> T:
        with self._lock:
            if self._admitted >= self._capacity:
                raise HTTPError(
                    429,
                    f"{self._capacity} adapter analyses are already running or queued "
                    "(settings analysis_workers, max_queued_analyses); retry later",
                    "too_many_analyses",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._admitted += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            with self._lock:
                self._admitted -= 1

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def install_serving_executor(workers: int) -> ThreadPoolExecutor:
    """Make a bounded, named pool the running loop's default: asyncio.to_thread uses it."""
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="serving")
    asyncio.get_running_loop().set_default_executor(executor)
    return executor
