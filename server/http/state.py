"""ServerState: what one app owns — the engine, its adapters, the store — and how it starts."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from adapters import AdapterInfo, AdapterNotFoundError
from adapters.peft_format import AdapterSource

from server.store import AdapterStore, check_name, is_valid_name
from server.engine.async_engine import AsyncEngine
from server.engine.llm_engine import LLMEngine
from server.http.errors import HTTPError
from server.http.metrics import Metrics
from server.engine.model_loader import BaseModel, load_base_model
from server.http.settings import Settings

log = logging.getLogger(__name__)


class ServerState:
    """Loads the model on a background thread so /health answers while a large model loads."""

    def __init__(self, settings: Settings, base: BaseModel | None = None, metrics: Metrics | None = None):
        self.settings, self.metrics = settings, metrics
        self.store = AdapterStore(settings.adapter_store) if settings.adapter_store else None
        self.engine: LLMEngine | None = None
        self.async_engine: AsyncEngine | None = None
        self.model_name: str | None = None
        self.load_error: BaseException | None = None
        self._store_versions: dict[str, tuple[int, int, int]] = {}  # name -> version it was registered at
        self._loaded = threading.Event()
        self._loader = threading.Thread(target=self._load, args=(base,), name="loraserve-loader", daemon=True)

    def start(self) -> None:
        self._loader.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout) and self.engine is not None

    @property
    def is_ready(self) -> bool:
        return self.engine is not None

    def stop(self, timeout: float | None = None) -> None:
        if self.async_engine is not None:
            self.async_engine.stop(timeout)

    def ready_engine(self) -> AsyncEngine:
        if self.async_engine is None:
            reason = f"model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise HTTPError(503, reason, "not_ready", headers={"Retry-After": "5"})
        return self.async_engine

    # Adapters: registry (memory) and store (disk), kept in step. Replicas may share the store, so
    # what another replica uploaded, replaced or deleted is picked up here too.
    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's `model` names (None = the base); unknown names are a 404."""
        engine = self.ready_engine().engine
        if model == self.model_name:
            return None
        if self.store is not None and is_valid_name(model):
            self._sync_stored(model)
        if model in engine.registry:
            return model
        raise AdapterNotFoundError(f"The model `{model}` does not exist")

    def sync_store(self) -> None:
        """Make the registry agree with the shared store for every stored adapter (for listings)."""
        if self.store is None:
            return
        stored = set(self.store.names())
        for name in stored | set(self._store_versions):
            self._sync_stored(name)

    def register(self, name: str, source: AdapterSource, replace: bool = False) -> AdapterInfo:
        engine = self.ready_engine()
        info = engine.engine.registry.add(check_name(name), source, replace=replace)
        self._store_versions.pop(name, None)
        if self.store is not None and isinstance(source, Path) and source == self.store.path(name):
            self._store_versions[name] = self.store.version(name)
        engine.refresh_stats()
        return info

    def unregister(self, name: str) -> None:
        engine = self.ready_engine()
        engine.engine.registry.remove(name)
        self._store_versions.pop(name, None)
        engine.refresh_stats()

    def _sync_stored(self, name: str) -> None:
        """One stat: register, reload or drop `name` to match its directory in the store."""
        version = self.store.version(name)
        known = self._store_versions.get(name)
        if version == known:
            return
        registry = self.ready_engine().engine.registry
        if version is None:  # deleted by another replica
            if name in registry:
                self.unregister(name)
            return
        if known is None and name in registry:
            return  # registered from elsewhere (--adapter, load_lora_adapter): that one wins
        try:
            self.register(name, self.store.path(name), replace=True)
        except Exception:  # a broken or half-copied entry must not break listing or other adapters
            log.exception("cannot load stored adapter %r", name)

    def _load(self, base: BaseModel | None) -> None:
        settings = self.settings
        try:
            base = base or load_base_model(settings.model, dtype=getattr(torch, settings.dtype),
                                           device=settings.device, cache_dir=settings.cache_dir)
            engine = LLMEngine(base, settings.engine_config())
            self.model_name = settings.served_model_name or base.name
            self._register_startup_adapters(engine)
            if self.metrics is not None:
                self.metrics.attach(engine)
            engine.publish_stats()
            self.engine, self.async_engine = engine, AsyncEngine(engine)
            log.info("ready: serving %s with %d adapters", self.model_name, len(engine.registry))
        except BaseException as exc:  # reported by /ready and every request
            self.load_error = exc
            log.exception("loading the model failed")
        finally:
            self._loaded.set()

    def _register_startup_adapters(self, engine: LLMEngine) -> None:
        for spec in self.settings.adapters:
            name, sep, path = spec.partition("=")
            if not sep:
                raise ValueError(f"--adapter {spec!r}: expected NAME=PATH")
            engine.registry.add(check_name(name), Path(path))
        for name in self.store.names() if self.store else []:
            if name not in engine.registry:
                try:
                    engine.registry.add(name, self.store.path(name))
                    self._store_versions[name] = self.store.version(name)
                except Exception:  # one bad file must not keep the server down
                    log.exception("skipping stored adapter %r", name)

