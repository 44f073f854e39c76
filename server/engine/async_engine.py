"""AsyncEngine: the engine loop on its own thread, streamed to asyncio callers.

Only the engine thread touches the engine: requests and aborts reach it through a command
queue, and each step's outputs are posted back to the caller's event loop, so the HTTP side
stays responsive while a forward pass runs.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from server.engine.llm_engine import LLMEngine
from server.engine.errors import EngineStoppedError, RequestError
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    """Wraps an `LLMEngine`; `stream(...)` yields one `RequestOutput` delta per step."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._closed = False  # the loop has exited: no command will run any more
        self._closing = threading.Lock()  # orders "queue a command" against "the loop exits"
        self._thread = threading.Thread(target=self._loop, name="loraserve-engine", daemon=True)
        self._thread.start()

    async def submit(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                     request_id: str | None = None) -> "RequestStream":
        """Queue a request; typed errors (unknown adapter, too long, queue full) raise here."""
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:  # registering it again would take the running stream's outputs
            raise RequestError(f"request id {request_id!r} is already in use", field="request_id")
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), outputs)
        try:
            await self.call(lambda: self.engine.add_request(prompt, params, adapter, request_id))
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return RequestStream(self, request_id, outputs)

    async def stream(self, prompt: str | list[int], params: SamplingParams, adapter: str | None = None,
                     request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas; leaving the loop early aborts it."""
        request = await self.submit(prompt, params, adapter, request_id)
        try:
            async for output in request:
                yield output
        finally:
            request.close()

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self.engine.abort(request_id))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps and return its result (or raise its error)."""
        future: Future = Future()

        def run():
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed to the caller, never kills the loop
                future.set_exception(exc)

        self._submit(run)
        return await asyncio.wrap_future(future)

    def refresh_stats(self) -> None:
        """Have the engine thread republish its stats snapshot (after an adapter change, say)."""
        self._submit(lambda: None)  # an idle loop publishes after running its commands

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let running ones finish, then end the loop."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_idle(self) -> bool:
        return not self.engine.has_unfinished() and self._commands.empty()

    def _submit(self, command: Callable[[], None]) -> None:
        with self._closing:
            if self._closed:
                raise EngineStoppedError("the server is shutting down")
            self._commands.put(command)
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._run_commands()
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception:  # a bug must not hang every client: fail what is running
                    log.exception("engine step failed; aborting running requests")
                    outputs = [o for rid in list(self.engine.requests) if (o := self.engine.abort(rid))]
                self._publish(outputs)
                self.engine.publish_stats()
            elif self._stopping:
                with self._closing:  # exit only if no command slipped in since _run_commands
                    if self._commands.empty():
                        self._closed = True
                        self.engine.publish_stats()
                        return
            else:
                self.engine.publish_stats()
                self._wake.wait()
                self._wake.clear()

    def _run_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            command()

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            target = self._streams.get(output.request_id)
            if target is not None:
                loop, outputs_queue = target
                loop.call_soon_threadsafe(outputs_queue.put_nowait, output)


class RequestStream:
    """The deltas of one submitted request; `close()` aborts it unless it already finished."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue):
        self.engine, self.request_id, self._outputs = engine, request_id, outputs
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            output = await self._outputs.get()
            self.finished = output.finished
            yield output

    def close(self) -> None:
        if self.engine._streams.pop(self.request_id, None) is not None and not self.finished:
            self.engine.abort(self.request_id)
