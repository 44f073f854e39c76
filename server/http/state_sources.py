"""Adapters from the configured sources, as ServerState does it: resolution on first use,
load_lora_adapter's source URIs, the fleet's per-name lock and the store's byte budget.

A mixin of ServerState (its only user), kept apart so the state's own file stays readable: it uses
the state's registry, store and settings as ServerState's own methods do.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager

from adapters import AdapterExistsError, AdapterNotFoundError, InvalidAdapterError, LoraAdapter
from adapters.compress import compress_files
from adapters.parse_ahead import ParseAhead
from server.engine.torch_threads import TransientThreads, torch_job
from server.sources import Files, Source, make_source
from server.store import is_valid_name

from .errors import HTTPError
from .metrics import Metrics
from .resolver import AdapterResolver, check_base, resolve_wait, unprocessable
from .settings import Settings

log = logging.getLogger(__name__)
# A resolved adapter is served from memory before its store write lands, so the write is background
# work: at the lowest priority it takes little CPU from the steps it runs beside. At normal priority,
# its page-cache copy and fsync (10-90 ms of CPU for 29 MB on the 2-core dev box) doubled the parse
# and the slot load of the adapter's first request, which it no longer runs beside (_store_resolved).
STORE_WRITES = TransientThreads(2, "loraserve-store-write", nice=19)
FIRST_STEP_WAIT_S = 1.0  # a resolved adapter no request runs this soon is stored all the same


class AdapterSources:
    """ServerState's adapter-source methods (see the module docstring)."""

    async def load_from_source(
        self, name: str, uri: str, energy: float | None = None, max_rank: int | None = None
    ) -> None:
        """load_lora_adapter's `lora_path` as `<a configured source's URI>/<adapter>`: only the
        configured sources are ever read, and the adapter's name there is checked as any other.
        `energy` / `max_rank` compress it as they would an upload (else the sources' settings do)."""
        self.check_name_free(name)
        sources = self.resolver.sources if self.resolver is not None else []
        prefixes = [(source, source.uri.rstrip("/") + "/") for source in sources]
        source, remote = next(((s, uri[len(p) :]) for s, p in prefixes if uri.startswith(p)), (None, None))
        if source is None or not is_valid_name(remote):
            message = "lora_path must be <a configured adapter source>/<adapter name>"
            raise HTTPError(400, message, "invalid_path", "lora_path")
        ahead = ParseAhead()
        files = await self.resolver.fetch(source, remote, ahead)
        if files is None:
            raise AdapterNotFoundError(f"{uri} does not hold an adapter", field="lora_path")
        storing = await self._install_fetched(name, source, files, ahead, energy, max_rank, after_first_step=False)
        if storing is not None:
            await storing

    async def _install_fetched(
        self,
        name: str,
        source: Source,
        files: Files,
        ahead: ParseAhead | None = None,
        energy: float | None = None,
        max_rank: int | None = None,
        after_first_step: bool = True,
    ) -> asyncio.Task | None:
        """What a source returned goes the upload's way: compressed if asked, validated whole (with
        what `ahead` checked while it arrived), then the engine, then the store's atomic create (a
        replica that stored it first wins). The adapter is served from memory as soon as it is
        valid; its store write lands after, once its first step has run unless `after_first_step`
        is False (_store_resolved). Returns that write as a task, or None without a store: the
        resolver holds the fleet's per-name lock until it is done."""
        engine = self.ready_engine()
        if self.settings.adapter_source_check_base:
            check_base(files, {self.model_name, self.settings.model, self.settings.served_model_name})
        if energy is None and max_rank is None:
            energy, max_rank = self.settings.adapter_source_energy, self.settings.adapter_source_max_rank
        if energy is not None or max_rank is not None:
            files = await self._compressed(files, source, energy, max_rank)
        parse = functools.partial(engine.parse_adapter, name, files, ahead)  # compressed files: checks miss, harmlessly
        try:
            adapter = await torch_job(parse)
        except InvalidAdapterError as exc:  # fetched whole, yet unusable: 422, naming file and field
            raise unprocessable(exc, source) from None
        await self.register(name, files, adapter=adapter)
        if self.store is None:
            return None
        storing = asyncio.ensure_future(self._store_resolved(name, adapter, files, after_first_step))
        self._storing[name] = storing
        storing.add_done_callback(lambda done: self._storing.pop(name) if self._storing.get(name) is done else None)
        return storing

    async def _store_resolved(self, name: str, adapter: LoraAdapter, files: Files, after_first_step: bool) -> None:
        """Store a served adapter, then make its registration mirror the stored version (its host
        copy is read back from there) and count it in the store's budget. The write waits for the
        first step that runs the adapter (its first request's prefill) to be over: 29 MB into the page
        cache beside that step made its first token 25-50 ms later on the dev box, at any priority.
        Nothing raised here reaches a request: the adapter is served from memory all the same, and a
        restart fetches it again."""
        try:
            if after_first_step:
                await self.ready_engine().ran_adapter(name, within_s=FIRST_STEP_WAIT_S)
            try:
                saved = await asyncio.wrap_future(STORE_WRITES.submit(self.store.save, name, files))
            except AdapterExistsError:  # another replica stored it first without the lock (it timed out)
                await self._adopt_stored(name)
                return
            if self.ready_engine().relocate_adapter(name, adapter, saved):
                self._store_versions[name] = saved.name
            if self.budget is not None:
                await asyncio.to_thread(self.budget.mark_resolved, name)
                await self._keep_store_in_budget(keep={name})
        except Exception:  # noqa: BLE001 - logged whole; see the docstring
            log.exception("resolved adapter %r is served, but storing it failed", name)

    async def _adopt_stored(self, name: str) -> None:
        """The store's copy of `name` replaces this replica's own unless it mirrors one already."""
        path = await asyncio.to_thread(self.store.current, name)
        if path is not None and name not in self._store_versions:
            await self.register(name, path, replace=True, store_version=path.name)

    @property
    def storing(self) -> frozenset[str]:
        """Names whose resolved copy is served while its store write is under way."""
        return frozenset(self._storing)

    async def stored(self, name: str) -> None:
        """Wait for the store's write of `name` if a resolution left one under way (DELETE waits,
        or the write would bring back what it deleted)."""
        storing = self._storing.get(name)
        if storing is not None:
            await asyncio.shield(storing)

    async def _compressed(self, files: Files, source: Source, energy: float | None, max_rank: int | None) -> Files:
        """Rank compression as on upload (SVDs: the analysis pool's work when the app has one)."""
        compress = functools.partial(compress_files, files, energy=energy, max_rank=max_rank)
        try:
            files, report = await torch_job(compress)
        except InvalidAdapterError as exc:
            raise unprocessable(exc, source) from None
        before, after = report.params_before, report.params_after
        log.info("compressed an adapter from %s: %d -> %d parameters", source.uri, before, after)
        return files

    def note_resolve_wait(self, streams) -> None:
        """Hand the time this request waited for its adapter's resolution (if it did) to the
        request log line of each of its engine requests."""
        waited = resolve_wait.get()
        if waited is not None and self.metrics is not None:
            for stream in streams:
                self.metrics.note_resolve_wait(stream.request_id, waited)

    @asynccontextmanager
    async def _fleet_lock(self, name: str) -> AsyncIterator[None]:
        """The store's per-name lock, taken off the loop: replicas sharing the store fetch once."""
        wait_s = self.settings.adapter_source_timeout * (len(self.settings.adapter_source) + 1)
        with ExitStack() as held:
            if not await asyncio.to_thread(held.enter_context, self.store.resolving(name, wait_s)):
                log.warning("fetching %r without the store's lock: another replica held it for %.0f s", name, wait_s)
            yield

    def _has_budget(self) -> bool:
        return self.store is not None and self.settings.adapter_store_max_bytes is not None

    async def _keep_store_in_budget(self, keep: set[str]) -> None:
        """Evict resolved adapters, least recently used first, sparing `keep`, those a request
        holds, those a request is resolving (ServerState.requesting) and those a named composition
        uses; each is unloaded here once its requests finish."""
        in_use = await self.ready_engine().adapters_in_use()
        composed = {adapter for terms in self.compositions.values() for adapter, _ in terms}
        spared = keep | in_use | composed | set(self.requested)
        evicted, stored = await asyncio.to_thread(self.budget.evict, spared)
        for name in evicted:
            log.info("evicted resolved adapter %r from the store (setting adapter_store_max_bytes)", name)
            try:
                await self.unregister(name)
            except AdapterNotFoundError:  # not loaded, or a concurrent pass (or a request's sync) took it
                self._store_versions.pop(name, None)  # (asking has_adapter first raced: two passes both saw it)
        if self.metrics is not None:
            self.metrics.on_store_budget(stored, len(evicted))


def make_resolver(settings: Settings, metrics: Metrics | None, exclusive) -> AdapterResolver | None:
    if not settings.adapter_source:
        return None
    sources = [
        make_source(uri, settings.max_upload_bytes, settings.adapter_source_timeout, settings.adapter_source_retries)
        for uri in settings.adapter_source
    ]
    observe = metrics.on_resolution if metrics is not None else None
    return AdapterResolver(sources, settings.adapter_source_negative_ttl, observe, exclusive)
