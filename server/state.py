"""ServerState: what one app owns — the engine, its adapters, the store — and how it starts."""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from adapters import AdapterInfo, AdapterNotFoundError
from adapters.peft_format import AdapterSource

from .adapter_store import AdapterStore, check_name, is_valid_name
from .async_engine import AsyncEngine
from .engine import LLMEngine
from .http_errors import HTTPError
from .model_loader import BaseModel, load_base_model
from .settings import Settings

log = logging.getLogger(__name__)


class ServerState:
    """Loads the model on a background thread so /health answers while a large model loads."""

    def __init__(self, settings: Settings, base: BaseModel | None = None):
        self.settings = settings
        self.store = AdapterStore(settings.adapter_store) if settings.adapter_store else None
        self.engine: LLMEngine | None = None
        self.async_engine: AsyncEngine | None = None
        self.model_name: str | None = None
        self.load_error: BaseException | None = None
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

    # Adapters: registry (memory) and store (disk), kept in step.
    def resolve_model(self, model: str) -> str | None:
        """The adapter a request's `model` names (None = the base); unknown names are a 404."""
        engine = self.ready_engine().engine
        if model == self.model_name:
            return None
        if model in engine.registry:
            return model
        if self.store is not None and is_valid_name(model) and model in self.store:
            self.register(model, self.store.path(model), replace=True)  # uploaded on another replica
            return model
        raise AdapterNotFoundError(f"The model `{model}` does not exist")

    def register(self, name: str, source: AdapterSource, replace: bool = False) -> AdapterInfo:
        return self.ready_engine().engine.registry.add(check_name(name), source, replace=replace)

    def _load(self, base: BaseModel | None) -> None:
        settings = self.settings
        try:
            base = base or load_base_model(settings.model, dtype=getattr(torch, settings.dtype),
                                           device=settings.device, cache_dir=settings.cache_dir)
            engine = LLMEngine(base, settings.engine_config())
            self.model_name = settings.served_model_name or base.name
            self._register_startup_adapters(engine)
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
                except Exception:  # one bad file must not keep the server down
                    log.exception("skipping stored adapter %r", name)

