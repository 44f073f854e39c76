"""Helpers for the HTTP tests: the real app under uvicorn on a free loopback port, real adapters for
the default model, an engine-only reference, and checks on OpenAI-shaped error bodies.

Every wait here is bounded in time; nothing listens anywhere but 127.0.0.1. The fixtures built on
these (adapter_dirs, the shared servers) live in conftest.py.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import torch
from fastapi import FastAPI

from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_loader import load_base_model
from server.engine.sampling_params import SamplingParams
from server.http.app import create_app
from server.http.settings import Settings
from server.http.state import ServerState
from support.engine import wait_for_engine
from support.servers import serve_in_thread

BASE = "SmolLM2-135M-Instruct"  # the default model's served name
LORA_KWARGS = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
ADAPTER_SEEDS = {"alpha": 1, "beta": 2, "gamma": 3}  # distinct weights per name, whatever ran before


@dataclass
class Served:
    """A running app: its base URL and the objects behind it (for white-box checks once idle)."""

    url: str
    app: FastAPI

    @property
    def state(self) -> ServerState:
        return self.app.state.server

    @property
    def engine(self) -> LLMEngine:
        return self.state.engine


@contextmanager
def serve(settings: Settings | None = None) -> Iterator[Served]:
    """Run `create_app(settings)` under uvicorn on a background thread until the block ends.

    Each app gets its own freshly loaded model (the engine wraps it in place)."""
    app = create_app(settings or Settings(), base=load_base_model())
    with serve_in_thread(app) as url:
        yield Served(url, app)


@contextmanager
def openai_client(served: Served) -> Iterator[openai.OpenAI]:
    """The official client on a served app; no retries, so each error is seen as the server sent it."""
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=120) as client:
        yield client


def wait_idle(served: Served, timeout: float = 30.0) -> None:
    """Until the engine has nothing running, waiting or queued: woken by the engine's own step and
    request events, then confirmed by a command on the engine thread, which runs only between steps,
    so the step that finished the last request is over too. Bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    async_engine, engine = served.state.async_engine, served.engine
    while (remaining := deadline - time.monotonic()) > 0:
        wait_for_engine(engine, lambda: not engine.has_unfinished(), remaining, "the engine going idle")
        confirm = async_engine.call(lambda: async_engine.is_idle)
        if asyncio.run(asyncio.wait_for(confirm, max(deadline - time.monotonic(), 0.1))):
            return
    stats = engine.stats()
    raise AssertionError(
        f"engine still busy after {timeout} s: {stats.num_running} running, {stats.num_waiting} waiting"
    )


def wait_stored(served: Served, timeout: float = 30.0) -> None:
    """Until no resolved adapter's store write (and the budget pass after it) is under way: a first
    request is answered from memory while its adapter is still being written. Bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    while served.state.storing:
        assert time.monotonic() < deadline, f"store writes still under way after {timeout} s: {served.state.storing}"
        time.sleep(0.01)


def assert_nothing_held(engine: LLMEngine) -> None:
    """Once idle: no KV reserved, no sequence left, no adapter lease held."""
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.kv_reserved_tokens == 0
    assert engine.requests == {}
    held = engine.registry.held()
    assert held == {}, f"adapter leases still held: {held}"


# Numeric tolerances
SAME_KERNELS_ULPS = 128  # one engine, two batch shapes: sums reordered over 30 layers
CROSS_KERNELS_ULPS = 1024  # the engine's packed oneDNN kernels against HF's MKL ones (vendor-dependent)


def fp32_tolerance(values, ulps: int) -> float:
    """`ulps` fp32 steps of the largest magnitude among `values` (None skipped): a bound that scales
    with the numbers compared instead of a fixed figure tuned on one CPU."""
    return ulps * torch.finfo(torch.float32).eps * max(abs(v) for v in values if v is not None)


# Errors
def assert_openai_error(response: httpx.Response, status: int, *words: str) -> dict:
    """The response is `status` with an OpenAI error body whose message names each of `words`."""
    assert response.status_code == status, f"{response.status_code} != {status}: {response.text}"
    error = assert_error_shape(response)
    for word in words:
        assert word.lower() in error["message"].lower(), f"{word!r} not in {error['message']!r}"
    return error


def assert_error_shape(response: httpx.Response) -> dict:
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    return assert_error_body(response.json())


def assert_error_body(body) -> dict:
    """{"error": {"message": str, "type": str, "code": ..., "param": ...}}, and nothing else."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error.get("message"), str) and error["message"], body
    assert isinstance(error.get("type"), str) and error["type"], body
    assert "code" in error and error["code"] is not None, body
    return error


# Adapters for the real default model
def write_real_adapters(root: Path, base_model: torch.nn.Module, make_peft_adapter) -> dict[str, Path]:
    """PEFT adapters (non-zero B) named by ADAPTER_SEEDS for the default model, written under `root`."""
    paths = {}
    for name, seed in ADAPTER_SEEDS.items():
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            paths[name] = make_peft_adapter(base_model, root / name, **LORA_KWARGS)
    return paths


def adapter_files(path: Path) -> dict[str, tuple[str, bytes]]:
    """The multipart `files` of an upload of the adapter directory `path`."""
    return {f: (f, (path / f).read_bytes()) for f in ("adapter_config.json", "adapter_model.safetensors")}


# The engine alone, as the reference for what the server must return
@functools.lru_cache(maxsize=1)
def _reference_engine(adapters: tuple[tuple[str, str], ...]) -> LLMEngine:
    engine = LLMEngine(load_base_model(), EngineConfig())
    for name, path in adapters:
        engine.registry.add(name, Path(path))
    return engine


_reference_lock = threading.Lock()


@functools.lru_cache(maxsize=256)
def _reference(adapters, prompt, adapter, max_tokens) -> str:
    with _reference_lock:
        engine = _reference_engine(adapters)
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        return engine.generate([list(prompt) if isinstance(prompt, tuple) else prompt], params, [adapter])[0].text


def reference_text(adapter_dirs: dict[str, Path], prompt: str | list[int], adapter: str | None, max_tokens: int) -> str:
    """Greedy text from `LLMEngine.generate` on a fresh model with the same adapters, one request alone."""
    key = tuple(sorted((name, str(path)) for name, path in adapter_dirs.items()))
    return _reference(key, tuple(prompt) if isinstance(prompt, list) else prompt, adapter, max_tokens)


def reference_chat_prompt(adapter_dirs: dict[str, Path], messages: list[dict]) -> list[int]:
    """The prompt ids the server builds for a chat (the tokenizer's own template)."""
    key = tuple(sorted((name, str(path)) for name, path in adapter_dirs.items()))
    return _reference_engine(key).tokenization.chat_prompt(messages)
