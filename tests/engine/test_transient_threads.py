"""TransientThreads (server/engine/torch_threads.py): bounded threads that end once idle. The
process-level check (no OpenMP team outlives an upload, a resolution, an analysis or a grammar
mask) is tests/http/test_torch_threads.py."""

from __future__ import annotations

import os
import sys
import threading
import time

import pytest

from server.engine.torch_threads import TransientThreads


def _named(prefix: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(prefix)]


def _wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_burst_waits_in_the_queue_on_at_most_workers_threads_that_end_when_idle():
    executor, release = TransientThreads(2, "burst"), threading.Event()
    futures = [executor.submit(lambda i=i: release.wait() and i * i) for i in range(40)]
    _wait_until(lambda: len(_named("burst-")) == 2)
    time.sleep(0.1)
    assert len(_named("burst-")) == 2 and not any(f.done() for f in futures), "a thread per task, or tasks ran"
    release.set()
    assert [f.result(timeout=10) for f in futures] == [i * i for i in range(40)]
    _wait_until(lambda: not _named("burst-"))  # idle threads end: none keeps an OpenMP team
    assert executor.submit(lambda: 7).result(timeout=10) == 7  # and a later task starts a new one


def test_errors_reach_the_caller_and_shutdown_cancels_what_waits():
    executor, release = TransientThreads(1, "cancel"), threading.Event()
    failing = executor.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    running = executor.submit(release.wait)
    _wait_until(running.running)
    waiting = executor.submit(lambda: "never")
    executor.shutdown(cancel_futures=True)
    assert waiting.cancelled()
    with pytest.raises(RuntimeError, match="after shutdown"):
        executor.submit(lambda: None)
    release.set()
    assert running.result(timeout=10) is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_a_nice_executor_lowers_only_its_own_threads_priority():
    """Resolved adapters' store writes run this way (server/http/state_sources.py): background work
    that must not take CPU from the parse and the steps beside it, nor lower anyone else's priority."""
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    niceness = TransientThreads(1, "nice", nice=19).submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    )
    assert niceness.result(timeout=10) == 19
    assert TransientThreads(1, "plain").submit(lambda: os.getpriority(os.PRIO_PROCESS, 0)).result(timeout=10) == own
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
