"""ServerState: what one app owns — the engine, its adapters, the store — and how it starts.

The engine thread is the only writer of the engine and its registry: this module parses adapter
files on worker threads (never on the event loop, never on the engine thread) and hands the
engine only the cheap install or remove, as a command.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from adapters import AdapterInfo, AdapterNotFoundError, LoraAdapter
from adapters.peft_format import AdapterSource
from server.engine.adapter_ref import BASE_REF, AdapterRef, Term, check_scale
from server.engine.async_engine import AsyncEngine
from server.engine.errors import RequestError
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import BaseModel, load_base_model
from server.engine.torch_threads import torch_job
from server.store import AdapterStore, check_name, is_valid_name
from server.store_budget import StoreBudget

from .errors import HTTPError
from .limits import RequestLimits, max_token_bytes
from .metrics import Metrics
from .settings import Settings
from .state_sources import AdapterSources, make_resolver

log = logging.getLogger(__name__)


class ServerState(AdapterSources):
    """Loads the model on a background thread so /health answers while a large model loads.

    `on_fatal(reason)` is called once when the server cannot go on: the model or a startup adapter
    failed to load, or the engine thread died. The CLI exits non-zero on it, so a supervisor restarts."""

    def __init__(
        self,
        settings: Settings,
        base: BaseModel | None = None,
        metrics: Metrics | None = None,
        on_fatal: Callable[[str], None] | None = None,
    ):
        self.settings, self.metrics, self.on_fatal = settings, metrics, on_fatal
        self.store = AdapterStore(settings.adapter_store) if settings.adapter_store else None
        self.resolver = make_resolver(settings, metrics, self._fleet_lock if self.store is not None else None)
        self.budget = StoreBudget(self.store, settings.adapter_store_max_bytes) if self._has_budget() else None
        self.engine: LLMEngine | None = None
        self.async_engine: AsyncEngine | None = None
        self.model_name: str | None = None
        self.load_error: BaseException | None = None
        self.limits: RequestLimits | None = None  # set once the model (and so its tokenizer) is loaded
        self._store_versions: dict[str, str] = {}  # name -> store version it was registered at
        self._storing: dict[str, asyncio.Task] = {}  # name -> its resolved copy's store write, under way
        self.compositions: dict[str, tuple[Term, ...]] = {}  # named compositions: name -> ((adapter, scale), ...)
        self.requested: Counter[str] = Counter()  # names requests are resolving, until they are bound
        self._loaded = threading.Event()
        self._loader = threading.Thread(target=self._load, args=(base,), name="loraserve-loader", daemon=True)

    def start(self) -> None:
        self._loader.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout) and self.engine is not None

    @property
    def is_ready(self) -> bool:
        return self.async_engine is not None and self.async_engine.is_alive

    @property
    def failure(self) -> str | None:
        """Why this process cannot serve any more (it will exit), or None."""
        if self.load_error is not None:
            return f"startup failed: {self.load_error}"
        if self.async_engine is not None and not self.async_engine.is_alive and self.async_engine.fatal_error:
            return f"the engine thread died: {self.async_engine.fatal_error!r}"
        return None

    def stop(self, timeout: float | None = None) -> None:
        if self.async_engine is not None:
            self.async_engine.stop(timeout)
        if self.engine is not None:  # the grammar worker processes go with the server
            self.engine.grammars.close()

    def ready_engine(self) -> AsyncEngine:
        failure = self.failure
        if failure is not None:
            raise HTTPError(503, failure, "load_failed" if self.load_error else "engine_dead")
        if self.async_engine is None:
            raise HTTPError(503, "the model is still loading", "not_ready", headers={"Retry-After": "5"})
        return self.async_engine

    # Adapters: registry (memory) and store (disk), kept in step. Replicas may share the store, so
    # what another replica uploaded, replaced or deleted is picked up here too.
    @asynccontextmanager
    async def requesting(self, model: str, adapters: list | None = None) -> AsyncIterator[AdapterRef]:
        """`resolve_model`, with the names asked for spared by the store budget's evictions until the
        block ends: a request submitted inside it is bound to its adapters' versions, which a later
        eviction no longer takes from it. Without this another request's resolution could evict an
        adapter between this one's resolution and its submission (a 404 for a name just resolved)."""
        names = [model] if adapters is None else [term.name for term in adapters]
        self.requested.update(names)
        try:
            yield await self.resolve_model(model, adapters)
        finally:
            self.requested.subtract(names)
            self.requested = +self.requested  # drop the names no request holds

    async def resolve_model(self, model: str, adapters: list | None = None) -> AdapterRef:
        """What a request's `model` (and `adapters` field) ask for, made here once: the base, one
        adapter, a named composition, or the field's composition on the base. Unknown names: 404."""
        if adapters is not None:
            if model != self.model_name:
                raise RequestError(
                    f"must be the base model {self.model_name!r} when `adapters` composes adapters", field="model"
                )
            return AdapterRef.composed(
                [(await self._resolve_term(index, term.name), term.scale) for index, term in enumerate(adapters)]
            )
        if model == self.model_name:
            return BASE_REF
        if model in self.compositions:
            return AdapterRef.composed(self.compositions[model], label=model)
        if not await self.has_adapter(model):
            raise AdapterNotFoundError(f"The model `{model}` does not exist")
        return AdapterRef.named(model)

    async def has_adapter(self, name: str) -> bool:
        """Whether `name` is a registered adapter, after picking up what another replica stored,
        or what the configured sources have under that name (resolved on first use)."""
        if await self._is_registered(name):
            if self.budget is not None and self.budget.is_touch_due(name):
                await asyncio.to_thread(self.budget.touch, name)
            return True
        if self.resolver is None or not is_valid_name(name) or name == self.model_name or name in self.compositions:
            return False
        return await self.resolver.resolve(name, self._is_registered, self._install_fetched)

    async def _is_registered(self, name: str) -> bool:
        if self.store is not None and is_valid_name(name):
            await self._sync_stored(name)
        return self.ready_engine().has_adapter(name)

    async def _resolve_term(self, index: int, name: str) -> str:
        if name in self.compositions:
            raise RequestError(f"{name!r} is a composition: list its adapters instead", field=f"adapters[{index}].name")
        if name == self.model_name or not await self.has_adapter(name):
            raise AdapterNotFoundError(f"adapter {name!r} does not exist", field=f"adapters[{index}].name")
        return name

    async def sync_store(self) -> None:
        """Make the registry agree with the shared store for every stored adapter (for listings)."""
        if self.store is None:
            return
        stored = set(await asyncio.to_thread(self.store.names))
        for name in sorted((stored | set(self._store_versions)) - set(self.compositions)):  # one kind per name
            await self._sync_stored(name)

    async def register(
        self,
        name: str,
        source: AdapterSource,
        replace: bool = False,
        adapter: LoraAdapter | None = None,
        store_version: str | None = None,
    ) -> AdapterInfo:
        """Parse `source` (unless `adapter` is its parse already) off the loop, then install it on the
        engine thread. `store_version` marks a registration that mirrors the store's entry."""
        engine = self.ready_engine()
        self.check_name_free(name)
        if adapter is None:
            adapter = await torch_job(engine.parse_adapter, name, source)
        info = await engine.install_adapter(name, adapter, source, replace=replace)
        self._store_versions.pop(name, None)
        if store_version is not None:
            self._store_versions[name] = store_version
        engine.refresh_stats()
        return info

    def check_name_free(self, name: str) -> str:
        """A valid name that no composition and not the base already has: either would make the
        adapter unreachable (a `model` resolves to them first) or list one name twice."""
        check_name(name)
        if name == self.model_name or name in self.compositions:
            kind = "the base model" if name == self.model_name else "a composition"
            raise HTTPError(409, f"{name!r} is already the name of {kind}", "name_in_use", "name")
        return name

    async def is_adapter_name(self, name: str) -> bool:
        """Whether `name` is an adapter's: registered, or in the store though unloaded (it is loaded
        again on its next use, so its name stays taken)."""
        if self.ready_engine().has_adapter(name):
            return True
        return self.store is not None and await asyncio.to_thread(self.store.__contains__, name)

    async def add_composition(self, name: str, terms: tuple[Term, ...], replace: bool = False) -> None:
        """Name a composition of registered adapters; persisted in the store when there is one.
        `replace` replaces a composition only: an adapter's name stays its own until it is deleted."""
        check_name(name)
        engine = self.ready_engine()
        if name == self.model_name or await self.is_adapter_name(name):
            kind = "the base model" if name == self.model_name else "an adapter (delete it first)"
            raise HTTPError(409, f"{name!r} is already the name of {kind}", "name_in_use", "name")
        if name in self.compositions and not replace:
            raise HTTPError(
                409, f"{name!r} is already the name of a composition; send replace=true", "name_in_use", "name"
            )
        if len(terms) > self.limits.max_adapters_per_request:
            raise RequestError(
                f"at most {self.limits.max_adapters_per_request} adapters (setting max_adapters_per_request)",
                field="compose",
            )
        for index, (adapter, scale) in enumerate(terms):
            check_scale(scale, engine.max_composition_scale, f"compose[{index}].scale")
            if adapter in self.compositions or adapter == self.model_name:
                raise RequestError(
                    "must name an adapter, not a composition or the base", field=f"compose[{index}].name"
                )
            if not await self.has_adapter(adapter):
                raise AdapterNotFoundError(f"adapter {adapter!r} does not exist", field=f"compose[{index}].name")
        if self.store is not None:
            await asyncio.to_thread(self.store.save_composition, name, terms, replace)
        self.compositions[name] = tuple(terms)

    async def remove_composition(self, name: str) -> None:
        if self.store is not None:
            await asyncio.to_thread(self.store.delete_composition, name)
        self.compositions.pop(name, None)

    def check_unused(self, adapter: str) -> None:
        """An adapter a named composition uses cannot be deleted: a 409 naming the composition."""
        for name, terms in sorted(self.compositions.items()):
            if any(term == adapter for term, _ in terms):
                raise HTTPError(
                    409,
                    f"adapter {adapter!r} is used by the composition {name!r}; delete that first",
                    "adapter_in_use",
                    "name",
                )

    async def unregister(self, name: str) -> None:
        engine = self.ready_engine()
        await engine.remove_adapter(name)
        self._store_versions.pop(name, None)
        engine.refresh_stats()

    async def _sync_stored(self, name: str) -> None:
        """One readlink: register, reload or drop `name` to match its entry in the store."""
        path = await asyncio.to_thread(self.store.current, name)
        version = None if path is None else path.name
        known = self._store_versions.get(name)
        if version == known:
            return
        engine = self.ready_engine()
        if version is None:  # deleted by another replica
            if engine.has_adapter(name):
                await self.unregister(name)
            return
        if known is None and engine.has_adapter(name):
            return  # registered from elsewhere (--adapter, load_lora_adapter): that one wins
        try:
            await self.register(name, path, replace=True, store_version=version)
        except Exception:  # a broken or half-copied entry must not break listing or other adapters
            log.exception("cannot load stored adapter %r", name)

    def _load(self, base: BaseModel | None) -> None:
        settings = self.settings
        try:
            base = base or load_base_model(
                settings.model,
                dtype=settings.dtype,
                device=settings.device,
                cache_dir=settings.cache_dir,
            )
            engine = LLMEngine(base, settings.engine_config())
            self.model_name = settings.served_model_name or base.name
            prompt_bytes = settings.max_prompt_bytes or engine.max_model_len * max_token_bytes(base.tokenizer)
            self.limits = RequestLimits(
                settings.max_stop_sequences,
                settings.max_stop_length,
                prompt_bytes,
                engine.max_model_len,
                settings.max_adapters_per_request,
                settings.max_prompts_per_request,
                settings.max_stop_token_ids,
                engine.vocab_size,
            )
            self._register_startup_adapters(engine)  # no engine thread yet: this thread may write
            for source in self.resolver.sources if self.resolver is not None else []:
                source.prepare()
            self.compositions = self._stored_compositions(engine)
            if self.metrics is not None:
                self.metrics.attach(engine)
            engine.publish_stats()
            self.engine, self.async_engine = engine, AsyncEngine(engine, on_fatal=self._engine_died)
            log.info("ready: serving %s with %d adapters", self.model_name, len(engine.registry))
        except BaseException as exc:  # reported by /health, /ready and every request; the CLI exits
            self.load_error = exc
            log.exception("startup failed")
            self._fatal(f"startup failed: {exc}")
        finally:
            self._loaded.set()

    def _engine_died(self, exc: BaseException) -> None:
        self._fatal(f"the engine thread died: {exc!r}")

    def _fatal(self, reason: str) -> None:
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _stored_compositions(self, engine: LLMEngine) -> dict[str, tuple[Term, ...]]:
        """The store's compositions, less any whose name an adapter or the base holds: a store written
        before names were one namespace may have both, and a name must resolve (and list) once. The
        adapter keeps the name; the composition's file stays, ignored, for its owner to rename."""
        if self.store is None:
            return {}
        compositions = self.store.compositions()
        for name in sorted(compositions):
            if name == self.model_name or name in engine.registry or name in self.store:
                log.warning(
                    "ignoring stored composition %r: an adapter or the base model has that name "
                    "(remove .compositions/%s.json from the store to silence this)",
                    name,
                    name,
                )
                del compositions[name]
        return compositions

    def _register_startup_adapters(self, engine: LLMEngine) -> None:
        for spec in self.settings.adapters:
            name, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
            engine.registry.add(check_name(name), Path(path))
        for name in self.store.names() if self.store else []:
            if name not in engine.registry:
                try:
                    path = self.store.current(name)
                    engine.registry.add(name, path)
                    self._store_versions[name] = path.name
                except Exception:  # one bad stored file must not keep the server down
                    log.exception("skipping stored adapter %r", name)
