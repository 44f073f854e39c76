"""Resolution on first use: an adapter name the server does not know is looked up in the configured
sources (server/sources.py), in order, once per name however many requests ask at the same time.

The first request for a name starts one resolution; every request for that name arriving while it
runs awaits the same one and gets its outcome, an error included (with a lock, each waiter would try
a hanging source again in turn: 32 waiters, 32 timeouts). The resolution re-checks first (another
replica may have just brought the name into the shared store), then tries each source off the event
loop and off the engine thread. An adapter is served as soon as it is valid; the store's write of it
may still be under way, and the per-name lock is held until it lands, so another replica waiting for
the name finds it stored instead of fetching it again. A name found nowhere is remembered for
`negative_ttl_s`, so a typo does not reach the object store on every request; a source that fails
or does not answer within its timeout is a 503 with Retry-After, and is not remembered: the next
request tries again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, nullcontext
from contextvars import ContextVar

from adapters.config import CONFIG_FILE
from adapters.errors import IncompatibleAdapterError, InvalidAdapterError, LoraServeError
from adapters.parse_ahead import ParseAhead
from server.sources import Files, Source, SourceUnavailableError, UnusableSourceAdapterError

MAX_REMEMBERED_MISSING = 10_000  # names found nowhere, kept for negative_ttl_s; the oldest go first

log = logging.getLogger(__name__)
# Seconds the current request waited for its model's resolution (None: it waited for none); set in the
# request's own task, read by the route once its engine requests exist, for their log lines.
resolve_wait: ContextVar[float | None] = ContextVar("resolve_wait", default=None)

Observe = Callable[[str, str, float, int, float | None], None]  # (source, outcome, seconds, bytes, fetch seconds)
# Installs what a source returned, with what the ParseAhead it was fetched into read of it;
# returns its store write still under way (None: nothing left to wait for).
Install = Callable[[str, Source, Files, ParseAhead | None], Awaitable[Awaitable[None] | None]]
Exclusive = Callable[[str], AbstractAsyncContextManager]  # one holder per name across replicas (the store's lock)


class AdapterResolver:
    """The configured sources, a per-name lock and a short memory of names found nowhere."""

    def __init__(
        self,
        sources: list[Source],
        negative_ttl_s: float,
        observe: Observe | None = None,
        exclusive: Exclusive | None = None,
    ):
        self.sources, self.negative_ttl_s, self._observe = sources, negative_ttl_s, observe
        self._exclusive = exclusive or (lambda name: nullcontext())
        self.origins: dict[str, str] = {}  # name -> URI of the source it was resolved from
        self._flights: dict[str, asyncio.Future[bool]] = {}  # name -> its resolution under way
        self._missing: dict[str, float] = {}  # name -> monotonic time its negative entry expires
        self._writes: set[asyncio.Future] = set()  # locks held until a served adapter's store write lands

    def is_missing(self, name: str) -> bool:
        """Whether `name` was found nowhere less than `negative_ttl_s` ago."""
        expires = self._missing.get(name)
        if expires is not None and expires <= time.monotonic():
            del self._missing[name]
            return False
        return expires is not None

    async def resolve(self, name: str, is_present: Callable[[str], Awaitable[bool]], install: Install) -> bool:
        """True once `name` is present (here, or installed from the first source that has it). The
        time this caller waited is left in `resolve_wait` for its request's log line."""
        if self.is_missing(name):
            return False
        flight = self._flights.get(name)
        if flight is None:
            flight = asyncio.ensure_future(self._resolve_once(name, is_present, install))
            self._flights[name] = flight
            flight.add_done_callback(lambda done: self._landed(name, done))
        started = time.monotonic()
        try:
            return await asyncio.shield(flight)  # a client that goes away leaves the others' resolution running
        finally:
            resolve_wait.set(time.monotonic() - started)

    async def _resolve_once(self, name: str, is_present: Callable[[str], Awaitable[bool]], install: Install) -> bool:
        lock = AsyncExitStack()
        await lock.enter_async_context(self._exclusive(name))  # a replica that held it may have stored it
        try:
            found, writing = await self._resolve_exclusively(name, is_present, install)
        except BaseException:
            await lock.aclose()
            raise
        if writing is None:
            await lock.aclose()
        else:  # served now: the lock goes once the store holds it, for the replicas waiting on it
            release = asyncio.ensure_future(_after(writing, lock.aclose))
            self._writes.add(release)
            release.add_done_callback(self._writes.discard)
        return found

    async def _resolve_exclusively(self, name: str, is_present, install: Install) -> tuple[bool, Awaitable | None]:
        if await is_present(name):
            return True, None
        started = time.monotonic()
        for source in self.sources:
            ahead = ParseAhead()
            files = await self.fetch(source, name, ahead)
            if files is not None:
                return True, await self._install(name, source, files, ahead, install, started, time.monotonic())
        self._remember_missing(name)
        return False, None

    def _landed(self, name: str, flight: asyncio.Future[bool]) -> None:
        self._flights.pop(name, None)
        if not flight.cancelled():
            flight.exception()  # retrieved here too: every waiter may have gone away

    async def fetch(self, source: Source, name: str, ahead: ParseAhead | None = None) -> Files | None:
        """`name` from one source, off the loop, within its timeout; observed by source and outcome.
        A source that streams hands the weights to `ahead` as they arrive."""
        started = time.monotonic()
        try:
            files = await asyncio.wait_for(asyncio.to_thread(source.fetch, name, ahead), source.timeout_s)
        except (TimeoutError, asyncio.TimeoutError):
            self._record(source, "unavailable", started)
            raise SourceUnavailableError(
                f"adapter source {source.uri} did not answer within {source.timeout_s} s "
                "(setting adapter_source_timeout); retry later"
            ) from None
        except SourceUnavailableError:
            self._record(source, "unavailable", started)
            raise
        except LoraServeError:
            self._record(source, "invalid", started)
            raise
        if files is None:
            self._record(source, "absent", started)
        return files

    async def _install(
        self,
        name: str,
        source: Source,
        files: Files,
        ahead: ParseAhead | None,
        install: Install,
        started: float,
        fetched: float,
    ) -> Awaitable | None:
        try:
            writing = await install(name, source, files, ahead)
        except LoraServeError:
            self._record(source, "invalid", started)
            raise
        num_bytes = sum(len(data) for data in files.values())
        self._record(source, "resolved", started, num_bytes, fetched - started)
        self.origins[name] = source.uri
        now = time.monotonic()
        log.info(
            "resolved adapter %r from %s (%d bytes) in %.3f s: fetch %.3f s, load %.3f s",
            *(name, source.uri, num_bytes, now - started, fetched - started, now - fetched),
        )
        return writing

    def _record(
        self, source: Source, outcome: str, started: float, num_bytes: int = 0, fetch_s: float | None = None
    ) -> None:
        if self._observe is not None:
            self._observe(source.uri, outcome, time.monotonic() - started, num_bytes, fetch_s)

    def _remember_missing(self, name: str) -> None:
        if self.negative_ttl_s <= 0:
            return
        while len(self._missing) >= MAX_REMEMBERED_MISSING:
            del self._missing[next(iter(self._missing))]
        self._missing[name] = time.monotonic() + self.negative_ttl_s


async def _after(writing: Awaitable, then: Callable[[], Awaitable]) -> None:
    try:
        await writing
    finally:
        await then()


def check_base(files: Files, base_names: set[str | None]) -> None:
    """--adapter-source-check-base: the adapter must say it was trained on the served base (by its
    served name, its --model, or that path's last part), as vLLM's resolvers require."""
    try:
        trained_on = json.loads(files[CONFIG_FILE]).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        return  # not a JSON object: the parse that follows names the problem
    named = {name for name in base_names if name}
    accepted = named | {name.rstrip("/").rsplit("/", 1)[-1] for name in named}
    if trained_on not in accepted:
        raise IncompatibleAdapterError(
            f"is {trained_on!r}, not the served base {sorted(accepted)} (setting adapter_source_check_base)",
            file=CONFIG_FILE,
            field="base_model_name_or_path",
        )


def unprocessable(exc: InvalidAdapterError, source: Source) -> UnusableSourceAdapterError:
    return UnusableSourceAdapterError(f"{exc.detail} (from {source.uri})", file=exc.file, field=exc.field)
