"""What an adapter learned: GET /v1/adapters/{name}/analysis and /similarity?other=.

The math (adapters/analysis.py) runs on a worker thread, never on the event loop or the engine
thread, from the adapter version's own files in float64. A result is cached per adapter version:
a replace makes a new version, so it is analyzed afresh, and a dropped version takes its entry along.
"""
from __future__ import annotations

import asyncio
import threading
import weakref

from fastapi import APIRouter, Depends, Query, Request

from adapters import AdapterNotFoundError, AdapterVersion
from adapters.analysis import analyze, base_weights, similarity
from adapters.peft_format import read_factors

from .auth import require_api_key
from .state import ServerState

router = APIRouter(prefix="/v1")
read = [Depends(require_api_key)]


class AdapterAnalyses:
    """Analysis per adapter version, computed once. One at a time: each takes seconds of CPU for a
    large adapter, and queued requests for the same version then find it cached."""

    def __init__(self):
        self._results: weakref.WeakKeyDictionary[AdapterVersion, dict] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, version: AdapterVersion, layers) -> dict:
        """The analysis of `version` against the base layers `layers` (module -> LoraLinear)."""
        with self._lock:
            result = self._results.get(version)
            if result is None:
                _, config, factors = read_factors(version.source)
                result = self._results[version] = analyze(version.name, config, factors, base_weights(layers))
            return result

    @staticmethod
    def similarity(version: AdapterVersion, other: AdapterVersion) -> dict:
        return similarity(version.name, other.name, read_factors(version.source)[2], read_factors(other.source)[2])


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _analyses(request: Request) -> AdapterAnalyses:
    return request.app.state.adapter_analyses


async def _version(state: ServerState, name: str, field: str | None = None) -> AdapterVersion:
    """The current version of adapter `name` (one another replica stored included); 404 otherwise."""
    if name == state.model_name:
        raise AdapterNotFoundError(f"{name!r} is the base model, not an adapter", field=field)
    try:
        await state.resolve_model(name)
    except AdapterNotFoundError as exc:
        raise AdapterNotFoundError(exc.detail, field=field) from None
    return state.ready_engine().adapter_version(name)


@router.get("/adapters/{name}/analysis", dependencies=read)
async def adapter_analysis(name: str, request: Request) -> dict:
    """Per targeted module: rank, scale, ‖ΔW‖, singular values, effective ranks, amplification."""
    state = _state(request)
    version = await _version(state, name)
    layers = state.ready_engine().lora_layers
    return await asyncio.to_thread(_analyses(request).get, version, layers)


@router.get("/adapters/{name}/similarity", dependencies=read)
async def adapter_similarity(name: str, request: Request, other: str = Query(...)) -> dict:
    """Subspace similarity φ of the two adapters' A, per module both target, at full ranks."""
    state = _state(request)
    version, other_version = await _version(state, name), await _version(state, other, field="other")
    return await asyncio.to_thread(AdapterAnalyses.similarity, version, other_version)
