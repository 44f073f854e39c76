"""Adapters from the configured sources, as ServerState does it: resolution on first use,
load_lora_adapter's source URIs, the fleet's per-name lock and the store's byte budget.

A mixin of ServerState (its only user), kept apart so the state's own file stays readable: it uses
the state's registry, store and settings as ServerState's own methods do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager

from adapters import AdapterExistsError, AdapterNotFoundError, InvalidAdapterError
from server.sources import Files, Source, make_source
from server.store import is_valid_name

from .errors import HTTPError
from .metrics import Metrics
from .resolver import AdapterResolver, check_base, unprocessable
from .settings import Settings

log = logging.getLogger(__name__)


class AdapterSources:
    """ServerState's adapter-source methods (see the module docstring)."""

    async def load_from_source(self, name: str, uri: str) -> None:
        """load_lora_adapter's `lora_path` as `<a configured source's URI>/<adapter>`: only the
        configured sources are ever read, and the adapter's name there is checked as any other."""
        self.check_name_free(name)
        sources = self.resolver.sources if self.resolver is not None else []
        prefixes = [(source, source.uri.rstrip("/") + "/") for source in sources]
        source, remote = next(((s, uri[len(p) :]) for s, p in prefixes if uri.startswith(p)), (None, None))
        if source is None or not is_valid_name(remote):
            message = "lora_path must be <a configured adapter source>/<adapter name>"
            raise HTTPError(400, message, "invalid_path", "lora_path")
        files = await self.resolver.fetch(source, remote)
        if files is None:
            raise AdapterNotFoundError(f"{uri} does not hold an adapter", field="lora_path")
        await self._install_fetched(name, source, files)

    async def _install_fetched(self, name: str, source: Source, files: Files) -> None:
        """What a source returned goes the upload's way: validated whole, then the store's atomic
        create (a replica that stored it first wins, and this one loads that copy), then the engine."""
        engine = self.ready_engine()
        if self.settings.adapter_source_check_base:
            check_base(files, {self.model_name, self.settings.model, self.settings.served_model_name})
        try:
            adapter = await asyncio.to_thread(engine.parse_adapter, name, files)
        except InvalidAdapterError as exc:  # fetched whole, yet unusable: 422, naming file and field
            raise unprocessable(exc, source) from None
        if self.store is None:
            await self.register(name, files, adapter=adapter)
            return
        try:
            path = await asyncio.to_thread(self.store.save, name, files)
        except AdapterExistsError:
            await self._sync_stored(name)
            return
        await self.register(name, path, True, adapter=adapter, store_version=path.name)
        if self.budget is not None:
            await asyncio.to_thread(self.budget.mark_resolved, name)
            await self._keep_store_in_budget(keep={name})

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
        holds and those a named composition uses; each is unloaded here once its requests finish."""
        in_use = await self.ready_engine().adapters_in_use()
        composed = {adapter for terms in self.compositions.values() for adapter, _ in terms}
        evicted, stored = await asyncio.to_thread(self.budget.evict, keep | in_use | composed)
        for name in evicted:
            log.info("evicted resolved adapter %r from the store (setting adapter_store_max_bytes)", name)
            if self.ready_engine().has_adapter(name):
                await self.unregister(name)
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
