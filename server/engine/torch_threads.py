"""Torch work off the engine thread (adapter parses, compression, analysis, grammar masks) runs on
threads that end once their queue is empty, never on a pool's long-lived idle threads.

Why: torch on this CPU build parallelises with GNU OpenMP, which keeps a team of worker threads for
every thread that ever ran a parallel op, for as long as that thread lives. Once a process holds more
OpenMP threads than CPUs, those workers stop spinning between parallel regions and sleep instead, and
each of the engine's ~1,000 parallel ops a step pays a wake-up. Measured on 2 cores of an AMD EPYC:
one idle thread that had run a single parallel op, kept alive, took the engine thread's one-stream
decode from 42.5 to 52.0 ms a token (it was 38.9 once that thread had ended). A pooled worker that
parsed one adapter upload did the same to every later step of the server. A thread that ends takes
its team with it; one that runs task after task holds its team only while it works.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class TransientThreads(Executor):
    """At most `workers` threads, each running queued tasks until none is left and then ending: a
    thread lives only while there is torch work for it, so no idle one keeps a team. A burst of
    tasks waits in the queue, not on a thread each (a flood of uploads once made a thread apiece)."""

    def __init__(self, workers: int, name: str, nice: int = 0):
        """`nice`: each thread's own CPU niceness on Linux (19: runs on what the others leave over)."""
        self._workers, self._name, self._numbers, self._nice = workers, name, itertools.count(), nice
        self._lock = threading.Lock()
        self._queue: deque[tuple[Future, Callable, tuple, dict]] = deque()
        self._threads = 0  # alive: fewer than `workers` means a submit starts one
        self._closed = False

    def submit(self, fn: Callable[..., T], /, *args, **kwargs) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: cannot schedule new work after shutdown")
            self._queue.append((future, fn, args, kwargs))
            if self._threads == self._workers:
                return future  # a running thread takes it when it is done with its task
            self._threads += 1
            name = f"{self._name}-{next(self._numbers)}"
        threading.Thread(target=self._work, name=name, daemon=True).start()
        return future

    def _work(self) -> None:
        if self._nice:
            _lower_priority(self._nice)
        while True:
            with self._lock:
                if not self._queue:
                    self._threads -= 1
                    return  # ending takes this thread's OpenMP team with it
                future, fn, args, kwargs = self._queue.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - handed to whoever awaits the future
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:  # running tasks end on their own daemon threads
            self._closed = True
            cancelled = list(self._queue) if cancel_futures else []
            if cancel_futures:
                self._queue.clear()
        for future, *_ in cancelled:
            future.cancel()


def _lower_priority(nice: int) -> None:
    """This thread's niceness (Linux applies setpriority to one thread, given its id); an OS without
    per-thread priorities, or one that refuses, leaves it at the process's."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        log.debug("thread priority unchanged: %s", exc)


TORCH_JOBS = TransientThreads(max(2, os.cpu_count() or 2), "loraserve-torch")


async def torch_job(fn: Callable[..., T], *args) -> T:
    """`fn(*args)` on a thread of its own (see the module docstring), awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(TORCH_JOBS, fn, *args)
