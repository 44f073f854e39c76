"""AsyncEngine: the engine loop on its own thread, streamed to asyncio callers.

The engine thread is the only writer of the engine, its adapter registry and the slot buffers:
requests, aborts and adapter changes reach it as commands, run between steps, and each step's
outputs are posted back to the caller's event loop, so the HTTP side stays responsive while a
forward pass runs. A failing command or step fails its requests, never the thread; if the thread
dies anyway, every caller gets an error and `on_fatal` is told (the server then exits).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from typing import Any, NamedTuple

from adapters import AdapterInfo, AdapterVersion, LoraAdapter
from adapters.parse_ahead import FileChecks
from adapters.peft_format import AdapterSource

from .adapter_ref import BASE_REF, AdapterRef, max_composition_scale
from .errors import EngineDeadError, EngineFailedError, EngineStoppedError, RequestError
from .grammar import GrammarCompiler
from .host_memory import give_back
from .llm_engine import LLMEngine
from .sampling_params import SamplingParams
from .sequence import RequestOutput
from .tokenization import Tokenization
from .torch_threads import torch_job

log = logging.getLogger(__name__)
RAN_POLL_S = 0.01  # how often ran_adapter asks
IDLE_TRIM_SECONDS = 1.0  # idle this long after a step before freed memory goes back to the system


class AsyncEngine:
    """Wraps an `LLMEngine`; `stream(...)` yields one `RequestOutput` delta per step.

    This is all the HTTP layer sees of the engine: requests, the tokenization and grammars it
    uses on worker threads, and the adapter operations, writes run on the engine thread."""

    def __init__(self, engine: LLMEngine, on_fatal: Callable[[BaseException], None] | None = None):
        self._engine, self.on_fatal = engine, on_fatal
        self.fatal_error: BaseException | None = None  # why the engine thread died, if it did
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Target] = {}
        self._ids = itertools.count()
        self._stopping = False
        self._closed = False  # the loop has exited: no command will run any more
        self._closing = threading.Lock()  # orders "queue a command" against "the loop exits"
        self._thread = threading.Thread(target=self._run, name="loraserve-engine", daemon=True)
        self._thread.start()

    async def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: AdapterRef = BASE_REF,
        request_id: str | None = None,
        final_only: bool = False,
    ) -> RequestStream:
        """Queue a request; typed errors (unknown adapter, too long, queue full) raise here.
        `final_only`: its deltas arrive together when it finishes (a caller that answers once needs
        no wake-up per token: on 2 cores each one took time from the step running beside it)."""
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._streams:  # registering it again would take the running stream's outputs
            raise RequestError(f"request id {request_id!r} is already in use", field="request_id")
        registry = self._engine.registry
        for name in adapter.names:  # an evicted host copy is read here, never on the engine thread
            if registry.needs_host_read(name):
                await torch_job(registry.prepare_host, name)
        outputs: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = _Target(asyncio.get_running_loop(), outputs, [] if final_only else None)
        try:
            await self.call(lambda: self._engine.add_request(prompt, params, adapter, request_id))
        except BaseException:  # refused, or our caller was cancelled after the engine accepted it
            if self._streams.pop(request_id, None) is not None and self.is_alive:
                self.abort(request_id)
            raise
        return RequestStream(self, request_id, outputs)

    async def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        adapter: AdapterRef = BASE_REF,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its deltas; leaving the loop early aborts it."""
        request = await self.submit(prompt, params, adapter, request_id)
        try:
            async for output in request:
                yield output
        finally:
            request.close()

    def abort(self, request_id: str) -> None:
        self._submit(lambda: self._engine.abort(request_id))

    def detach(self, request_id: str) -> bool:
        """Stop delivering the request's outputs; True if it was still attached."""
        return self._streams.pop(request_id, None) is not None

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps and return its result (or raise its error).

        If the caller is cancelled before `fn` starts, `fn` never runs."""
        return await asyncio.wrap_future(self._submit(fn))

    def refresh_stats(self) -> None:
        """Have the engine thread republish its stats snapshot (after an adapter change, say)."""
        self._submit(lambda: None)  # an idle loop publishes after running its commands

    def stop(self, timeout: float | None = None) -> None:
        """Refuse new requests, let running ones finish, then end the loop."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self.fatal_error is None and self._thread.is_alive()

    @property
    def num_streams(self) -> int:
        """Requests whose outputs are still being delivered to a caller."""
        return len(self._streams)

    @property
    def is_idle(self) -> bool:
        return not self._engine.has_unfinished() and self._commands.empty()

    # The engine as the HTTP layer reads it (thread-safe: immutable, or behind the registry's lock)
    @property
    def tokenization(self) -> Tokenization:
        """Prompt encoding, chat template and token text; run it on a worker thread."""
        return self._engine.tokenization

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles (and caches) a request's grammar; run it on a worker thread."""
        return self._engine.grammars

    @property
    def lora_layers(self) -> Mapping[str, Any]:
        """The LoRA-wrapped layers by module name (read-only: what adapter analysis compares against)."""
        return self._engine.lora_model.layers

    # Adapters: reads from any thread; parse on a worker thread; writes as engine-thread commands
    @property
    def max_composition_scale(self) -> float:
        return max_composition_scale(self._engine.lora_model.dtype)

    def has_adapter(self, name: str) -> bool:
        return name in self._engine.registry

    def adapter_info(self, name: str) -> AdapterInfo:
        """What the registry says of `name`; AdapterNotFoundError if it is not registered."""
        return self._engine.registry.info(name)

    def list_adapters(self) -> list[AdapterInfo]:
        return self._engine.registry.list()

    def adapter_version(self, name: str) -> AdapterVersion:
        return self._engine.registry.version(name)

    async def adapters_in_use(self) -> set[str]:
        """Adapters that admitted requests hold (asked on the engine thread, between steps)."""
        registry = self._engine.registry
        return await self.call(lambda: set(registry.held()))

    def parse_adapter(self, name: str, source: AdapterSource, checks: FileChecks | None = None) -> LoraAdapter:
        """Read and validate an adapter against this base model (slow: not on the event loop)."""
        return self._engine.registry.parse(name, source, checks)

    async def ran_adapter(self, name: str, within_s: float) -> bool:
        """Wait until a step that ran `name` has finished (True), or `within_s` seconds have passed
        (False). Asked on the engine thread between steps: a step that loaded the adapter into its
        slot ends before the question after it is answered."""
        registry, deadline = self._engine.registry, time.monotonic() + within_s
        while not await self.call(lambda: registry.was_loaded(name)):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(RAN_POLL_S)
        return True

    async def install_adapter(
        self, name: str, adapter: LoraAdapter, source: AdapterSource, replace: bool = False
    ) -> AdapterInfo:
        registry = self._engine.registry
        return await self.call(lambda: registry.install(name, adapter, source, replace=replace))

    def relocate_adapter(self, name: str, adapter: LoraAdapter, source: AdapterSource) -> bool:
        """Point `name`'s version installed from `adapter` at `source`, a copy of its files; False
        if that version is no longer current."""
        return self._engine.registry.relocate(name, adapter, source)

    async def remove_adapter(self, name: str) -> None:
        registry = self._engine.registry
        await self.call(lambda: registry.remove(name))

    def _submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        with self._closing:
            if self.fatal_error is not None:
                raise EngineDeadError(f"the engine has stopped: {self.fatal_error!r}")
            if self._closed:
                raise EngineStoppedError("the server is shutting down")
            self._commands.put((fn, future))
        self._wake.set()
        return future

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - whatever killed the loop, nobody may hang on it
            log.critical("the engine thread died", exc_info=exc)
            self._die(exc)

    def _loop(self) -> None:
        worked = False  # since memory was last handed back
        while True:
            worked |= self._run_commands()
            if self._engine.has_unfinished():
                self._publish(self._step())
                self._engine.publish_stats()
                worked = True
            elif self._stopping:
                with self._closing:  # exit only if no command slipped in since _run_commands
                    if self._commands.empty():
                        self._closed = True
                        self._engine.publish_stats()
                        return
            else:
                self._engine.publish_stats()
                if not self._wake.wait(IDLE_TRIM_SECONDS):  # a second with nothing to do
                    if worked:
                        give_back()  # hand back what the work freed, once
                        worked = False
                    try:
                        self._engine.idle(interrupted=lambda: not self._commands.empty())
                    except Exception:  # noqa: BLE001 - idle work is optional; serving is not
                        log.exception("idle work failed; serving on")
                self._wake.wait()
                self._wake.clear()

    def _step(self) -> list[RequestOutput]:
        try:
            return self._engine.step()
        except Exception as exc:  # a bug must not hang every client: fail what is running, keep serving
            log.exception("engine step failed; failing the requests it held")
            error = EngineFailedError(f"the engine failed while running this request ({type(exc).__name__})")
            return [o for rid in list(self._engine.requests) if (o := self._engine.abort(rid, error))]

    def _run_commands(self) -> bool:
        """Run the queued commands; True if there were any."""
        ran = False
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return ran
            ran = True
            if not future.set_running_or_notify_cancel():
                continue  # its caller gave up before it ran
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, never kills the loop
                future.set_exception(exc)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            target = self._streams.get(output.request_id)
            if target is None:
                continue
            if target.held is None:
                target.loop.call_soon_threadsafe(target.outputs.put_nowait, output)
                continue
            target.held.append(output)
            if output.finished:
                target.loop.call_soon_threadsafe(_put_all, target.outputs, target.held)

    def _die(self, exc: BaseException) -> None:
        with self._closing:
            self.fatal_error = exc
            self._closed = True
        error = EngineDeadError(f"the engine has stopped: {exc!r}")
        while not self._commands.empty():
            _, future = self._commands.get_nowait()
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        self._publish([RequestOutput(rid, "", [], [], True, "abort", 0, 0, error=error) for rid in list(self._streams)])
        if self.on_fatal is not None:
            self.on_fatal(exc)


class _Target(NamedTuple):
    """Where a request's deltas go: its caller's loop and queue; `held` gathers them until it
    finishes where the caller asked for them all at once (None: each as it comes)."""

    loop: asyncio.AbstractEventLoop
    outputs: asyncio.Queue
    held: list[RequestOutput] | None


def _put_all(outputs: asyncio.Queue, items: list[RequestOutput]) -> None:
    for item in items:
        outputs.put_nowait(item)


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

    @property
    def num_pending(self) -> int:
        """Deltas that arrived and were not read yet."""
        return self._outputs.qsize()

    def close(self) -> None:
        if self.engine.detach(self.request_id) and not self.finished and self.engine.is_alive:
            self.engine.abort(self.request_id)
