"""Grammar workers: each new grammar is built first in a worker process, where a crash costs one request.

Why a process: llguidance is native code, and a grammar that crashes it (a 2,500-deep chain of rules
overflows the stack: a segfault) takes down the process that runs it. A thread cannot survive that,
and a fork of the server would copy a multi-GB process that runs threads (only the forking thread
lives on in the child, with the others' locks still held). So a worker is a fresh
`python -I grammar_check.py`: it imports llguidance alone (about 1 s to start, ~75 MB), is given the
tokenizer once, as JSON text, and its memory is capped (RLIMIT_AS). It stays warm between checks and
is replaced when it dies or runs past the timeout. Specs and answers cross its pipes as JSON lines.

Cost, paid once per distinct spec (a cached spec skips the worker): a round trip for a typical JSON
schema (three properties, 267 bytes) measured a median of 1.8 ms, and 3.0 ms under heavier load,
over 500 checks each on a shared 2-core AMD EPYC; about 0.9 ms of it is the build itself, which the
server then repeats in-process.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from .config import EngineSettings
from .errors import EngineFailedError, EngineStoppedError
from .grammar_check import GrammarRefused

log = logging.getLogger(__name__)

_SCRIPT = str(Path(__file__).with_name("grammar_check.py"))
_BOOT_TIMEOUT = 120.0  # seconds a new worker may take to import llguidance and build its tokenizer
CRASHED = "the grammar could not be compiled: the compiler crashed on it"


class GrammarWorkers:
    """A small pool of warm worker processes. `check` is thread-safe: each check holds one worker,
    and waits while all are busy. Workers start on first use; `close` stops them."""

    def __init__(self, setup: Callable[[], bytes], settings: EngineSettings):
        self.timeout, self.memory = settings.grammar_compile_timeout, settings.grammar_compile_memory
        self._setup = setup  # the first line each worker reads (tokenizer and limits), made on first start
        self._setup_line: bytes | None = None
        # Last in, first out: one warm worker serves until checks overlap. None: a slot not started.
        self._idle: queue.LifoQueue[_Worker | None] = queue.LifoQueue()
        for _ in range(settings.grammar_workers):
            self._idle.put(None)
        self._spare: _Worker | None = None  # started by warm(), for the first check to take
        self._live: list[_Worker] = []  # every started worker not yet stopped, for close()
        self._lock = threading.RLock()  # warm() starts a worker while holding it
        self._closer = weakref.finalize(self, _stop_all, self._live)  # at close(), collection or exit
        self.num_started = 0

    def warm(self) -> None:
        """Start the first worker now without waiting for it: it boots while the caller does its own work."""
        with self._lock:
            if self.num_started == 0 and self._closer.alive:
                self._spare = self._start()

    def check(self, kind: str, source: str) -> str | None:
        """None if a worker built the spec as far as its first mask, else why not in plain words. A
        crash or a timeout raises GrammarRefused, and the worker is replaced."""
        worker = self._idle.get()
        try:
            if not self._closer.alive:
                raise EngineStoppedError("the server is shutting down")
            if worker is None or not worker.is_alive():
                worker = self._take_spare() or self._start()
            return worker.check(kind, source, self.timeout)
        except _WorkerGone as exc:
            worker = self._replace(worker, restart=True)
            if not self._closer.alive:  # close() stopped it under this check
                raise EngineStoppedError("the server is shutting down") from None
            raise GrammarRefused(exc.reason) from None
        except EngineFailedError:  # it would not start: the next check tries a new one
            worker = self._replace(worker, restart=False)
            raise
        finally:
            self._idle.put(worker)

    def pids(self) -> list[int]:
        """The started workers' process ids (for checks that none is left behind)."""
        with self._lock:
            return [worker.proc.pid for worker in self._live]

    def close(self) -> None:
        """Stop every worker (they exit when their input closes); later checks are refused."""
        self._closer()

    def _take_spare(self) -> _Worker | None:
        with self._lock:
            spare, self._spare = self._spare, None
            return spare

    def _start(self) -> _Worker:
        with self._lock:
            if self._setup_line is None:
                self._setup_line = self._setup()
            worker = _Worker(self._setup_line, self.memory)
            self._live.append(worker)
            self.num_started += 1
            return worker

    def _replace(self, worker: _Worker, restart: bool) -> _Worker | None:
        """Stop a dead or stuck worker; `restart`: start a fresh one, which boots while the failed
        request is answered."""
        worker.stop(kill=True)
        with self._lock:
            if worker in self._live:
                self._live.remove(worker)
        return self._start() if restart and self._closer.alive else None


class _WorkerGone(Exception):
    """The worker crashed or ran past the timeout on this spec; `reason` is the request's 400."""

    def __init__(self, reason: str):
        self.reason = reason


class _Worker:
    """One worker process and its pipes (stderr is the server's, so a native crash report lands in its log)."""

    def __init__(self, setup_line: bytes, memory: int):
        self.memory = memory
        self.proc = subprocess.Popen([sys.executable, "-I", _SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.is_ready = False
        try:
            self.proc.stdin.write(setup_line)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died at once: its first read says how
        self._pending = b""

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def check(self, kind: str, source: str, timeout: float) -> str | None:
        if not self.is_ready:
            if self._read_line(_BOOT_TIMEOUT, booting=True) != {"ready": True}:
                raise EngineFailedError("the grammar worker sent an unexpected greeting")
            self.is_ready = True
        try:
            self.proc.stdin.write(json.dumps({"kind": kind, "source": source}).encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died: reading says how
        return self._read_line(timeout)["error"]

    def _read_line(self, timeout: float, booting: bool = False) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                if booting:
                    raise EngineFailedError(f"the grammar worker did not start within {_BOOT_TIMEOUT:.0f} s")
                raise _WorkerGone(
                    f"the grammar could not be compiled within {timeout:g} s (setting grammar_compile_timeout)"
                )
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise self._died(booting)
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def _died(self, booting: bool) -> Exception:
        code = self.proc.wait()
        log.warning("a grammar worker exited with code %s%s", code, " while starting" if booting else "")
        if booting:  # no request's fault: the server cannot check grammars (memory too small?)
            return EngineFailedError(
                f"the grammar worker exited with code {code} while starting (setting grammar_compile_memory "
                f"is {self.memory} bytes)"
            )
        if code == -signal.SIGABRT:  # Rust aborts when an allocation fails (RLIMIT_AS reached)
            return _WorkerGone(f"{CRASHED}, possibly out of memory (setting grammar_compile_memory)")
        return _WorkerGone(CRASHED)

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.proc.kill()
        try:
            self.proc.stdin.close()  # the worker exits when its input closes
        except BrokenPipeError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def _stop_all(workers: list[_Worker]) -> None:
    while workers:
        workers.pop().stop()
