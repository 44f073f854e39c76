"""What an adapter learned: GET /v1/adapters/{name}/analysis and /similarity?other=.

The math (adapters/analysis.py) runs in float64 from the adapter version's own files, on the bounded
analysis pool (executors.py), never on the event loop, the engine thread or the serving workers. An
analysis is cached per adapter version: a replace makes a new version, so it is analyzed afresh, and
a dropped version takes its entry along. A similarity is cached per pair of content identities.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict

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

    MAX_SIMILARITIES = 256  # pairs kept; each result is a few KB

    def __init__(self):
        self._results: weakref.WeakKeyDictionary[AdapterVersion, dict] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._similarities: OrderedDict[tuple[bytes, bytes], dict] = OrderedDict()
        self.num_similarities_computed = 0

    def get(self, version: AdapterVersion, layers) -> dict:
        """The analysis of `version` against the base layers `layers` (module -> LoraLinear)."""
        with self._lock:
            result = self._results.get(version)
            if result is None:
                _, config, factors = read_factors(version.source)
                result = self._results[version] = analyze(version.name, config, factors, base_weights(layers))
            return result

    def similarity(self, version: AdapterVersion, other: AdapterVersion) -> dict:
        """φ of the pair, computed once per pair of contents (names may change, contents do not)."""
        key = (version.identity, other.identity)
        with self._lock:
            cached = self._similarities.get(key)
            if cached is not None:
                self._similarities.move_to_end(key)
                return {**cached, "name": version.name, "other": other.name}
        result = similarity(version.name, other.name, read_factors(version.source)[2], read_factors(other.source)[2])
        with self._lock:
            self.num_similarities_computed += 1
            self._similarities[key] = result
            while len(self._similarities) > self.MAX_SIMILARITIES:
                self._similarities.popitem(last=False)
        return result


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
    return await request.app.state.analysis_pool.run(_analyses(request).get, version, layers)


@router.get("/adapters/{name}/similarity", dependencies=read)
async def adapter_similarity(name: str, request: Request, other: str = Query(...)) -> dict:
    """Subspace similarity φ of the two adapters' A, per module both target, at full ranks."""
    state = _state(request)
    version, other_version = await _version(state, name), await _version(state, other, field="other")
    return await request.app.state.analysis_pool.run(_analyses(request).similarity, version, other_version)
