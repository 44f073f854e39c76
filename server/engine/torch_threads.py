"""Torch work off the engine thread (adapter parses, compression, analysis, grammar masks) runs on
threads that end with it, never on a pool's long-lived threads.

Why: torch on this CPU build parallelises with GNU OpenMP, which keeps a team of worker threads for
every thread that ever ran a parallel op, for as long as that thread lives. Once a process holds more
OpenMP threads than CPUs, those workers stop spinning between parallel regions and sleep instead, and
each of the engine's ~1,000 parallel ops a step pays a wake-up. Measured on 2 cores of an AMD EPYC:
one idle thread that had run a single parallel op, kept alive, took the engine thread's one-stream
decode from 42.5 to 52.0 ms a token (it was 38.9 once that thread had ended). A pooled worker that
parsed one adapter upload did the same to every later step of the server. A thread that ends takes
its team with it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")


class ThreadPerTask(Executor):
    """At most `workers` tasks run at once, each on a new thread that ends with it; the others wait on
    their own thread for a turn (threads that wait have run no torch op, so hold no team)."""

    def __init__(self, workers: int, name: str):
        self._turns = threading.BoundedSemaphore(workers)
        self._name, self._numbers = name, itertools.count()
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args, **kwargs) -> Future:
        if self._closed:
            raise RuntimeError(f"{self._name}: cannot schedule new work after shutdown")
        future: Future = Future()
        name = f"{self._name}-{next(self._numbers)}"
        threading.Thread(target=self._run, args=(future, fn, args, kwargs), name=name, daemon=True).start()
        return future

    def _run(self, future: Future, fn: Callable, args: tuple, kwargs: dict) -> None:
        with self._turns:
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True  # running tasks end on their own daemon threads


TORCH_JOBS = ThreadPerTask(max(2, os.cpu_count() or 2), "loraserve-torch")


async def torch_job(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` on a thread of its own (see the module docstring), awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(TORCH_JOBS, fn, *args)
