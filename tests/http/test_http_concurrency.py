"""Concurrent HTTP traffic over several adapters: the same greedy text as the engine alone, and a
bounded load test with clients that hang up mid-stream, after which nothing may be left held."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from support.http import BASE, assert_nothing_held, reference_text, wait_idle

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1 2 3 4 5"]
ADAPTERS = [None, "alpha", "beta"]
PAIRS = [(PROMPTS[i % 4], ADAPTERS[i % 3]) for i in range(8)]  # 8 requests: every adapter, mixed prompts
NUM_TOKENS = 8
TIME_LIMIT = 180.0  # seconds for a whole concurrent round; far above what it needs


@pytest.fixture(scope="module")
def served(default_server):
    return default_server  # one server per settings profile (tests/http/conftest.py)


def _body(prompt: str, adapter: str | None, max_tokens: int = NUM_TOKENS, stream: bool = False) -> dict:
    return {
        "model": adapter or BASE,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


async def _whole(client: httpx.AsyncClient, prompt: str, adapter: str | None) -> str:
    response = await client.post("/v1/completions", json=_body(prompt, adapter))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


async def _streamed(
    client: httpx.AsyncClient,
    prompt: str,
    adapter: str | None,
    max_tokens: int = NUM_TOKENS,
    hang_up_after: int | None = None,
) -> tuple[str, str | None]:
    """(text, finish_reason); with `hang_up_after`, close the connection after that many chunks."""
    text, reason, num_chunks = "", None, 0
    async with client.stream("POST", "/v1/completions", json=_body(prompt, adapter, max_tokens, True)) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[5:])["choices"][0]
            text, reason, num_chunks = text + choice["text"], choice["finish_reason"], num_chunks + 1
            if hang_up_after is not None and num_chunks >= hang_up_after:
                return text, "hung up"
    return text, reason


async def _all(url: str, make_calls) -> list:
    limits = httpx.Limits(max_connections=32)
    async with httpx.AsyncClient(base_url=url, timeout=TIME_LIMIT, limits=limits) as client:
        return await asyncio.wait_for(asyncio.gather(*make_calls(client)), TIME_LIMIT)


def test_concurrent_requests_equal_the_engine_alone(served, adapter_dirs):
    def calls(client):  # even positions whole, odd ones streamed: both paths share the batches
        return [_whole(client, p, a) if i % 2 == 0 else _streamed(client, p, a) for i, (p, a) in enumerate(PAIRS)]

    gather_steps = served.engine.stats().steps_by_mode.get("gather", 0)  # the server is shared: count from here
    results = asyncio.run(_all(served.url, calls))
    texts = [r if isinstance(r, str) else r[0] for r in results]
    expected = [reference_text(adapter_dirs, p, a, NUM_TOKENS) for p, a in PAIRS]
    assert texts == expected
    assert len({t for t, (_, a) in zip(texts, PAIRS) if a is None}) > 1  # not one text for every prompt
    assert served.engine.stats().steps_by_mode.get("gather", 0) > gather_steps, "adapters never shared a batch"


def test_load_with_hang_ups_leaves_nothing_held(served, adapter_dirs):
    """12 streaming clients over the base and three adapters; every third hangs up after 2 chunks
    of a request that would otherwise run for 300 tokens, so only an abort frees it in time."""
    finished: list[str | None] = []
    served.engine.request_listeners.append(lambda stats: finished.append(stats.finish_reason))
    clients = [(i % 3 == 0, *PAIRS[i % 8]) for i in range(12)]

    def calls(client):
        return [
            _streamed(client, prompt, "gamma" if hangs_up else adapter, 300, 2)
            if hangs_up
            else _streamed(client, prompt, adapter)
            for hangs_up, prompt, adapter in clients
        ]

    try:
        results = asyncio.run(_all(served.url, calls))
        wait_idle(served, timeout=60)
    finally:
        served.engine.request_listeners.pop()
    for (hangs_up, prompt, adapter), (text, reason) in zip(clients, results):
        if hangs_up:
            assert reason == "hung up"
        else:
            assert (text, reason) == (reference_text(adapter_dirs, prompt, adapter, NUM_TOKENS), "length")
    assert sorted(finished, key=str) == ["abort"] * 4 + ["length"] * 8
    assert_nothing_held(served.engine)
    assert served.engine.stats().kv_reserved_tokens == 0

    after = httpx.post(served.url + "/v1/completions", json=_body(PROMPTS[0], "gamma", 2), timeout=60)
    assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] == "length"
