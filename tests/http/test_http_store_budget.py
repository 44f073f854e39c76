"""The adapter store's byte budget over real HTTP: adapters resolved from a directory source are
evicted least recently used once the store is over --adapter-store-max-bytes; an uploaded one and
one a running request holds never are; an evicted one resolves again on its next request."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.http.settings import Settings
from support.http import adapter_files, reference_text, serve, wait_stored

pytestmark = pytest.mark.real_model

PROMPT = "Once upon a time"
BUDGET = 6_000_000  # three adapters fit, four do not
CONCURRENT = [f"c{i}" for i in range(6)]


@pytest.fixture(scope="module")
def served(adapter_dirs, tmp_path_factory):
    base = tmp_path_factory.mktemp("budget")
    for name in ("r1", "r2", "r3", *CONCURRENT):
        shutil.copytree(adapter_dirs["alpha"], base / "tree" / name)
    settings = Settings(
        adapter_source=[str(base / "tree")], adapter_store=base / "store", adapter_store_max_bytes=BUDGET
    )
    with serve(settings) as served:
        served.store_root = base / "store"
        yield served


def _complete(http: httpx.Client, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    return http.post("/v1/completions", json=body)


def _stored(served) -> dict[str, int]:
    wait_stored(served)  # a first request is answered before its adapter's write (and budget pass) ends
    return served.state.budget.stored_bytes()


def test_resolved_adapters_are_evicted_lru_sparing_uploads_and_adapters_in_use(served, adapter_dirs):
    with (
        httpx.Client(base_url=served.url, timeout=120) as http,
        httpx.Client(base_url=served.url, timeout=120) as other,
    ):
        assert (
            http.post("/v1/adapters", data={"name": "kept"}, files=adapter_files(adapter_dirs["beta"])).status_code
            == 201
        )
        assert _complete(http, "r1").status_code == 200 and _complete(http, "r2").status_code == 200
        assert set(_stored(served)) == {"kept", "r1", "r2"}
        body = {
            "model": "r1",
            "prompt": PROMPT,
            "max_tokens": 200,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        with http.stream("POST", "/v1/completions", json=body) as stream:
            lines = stream.iter_lines()
            first = next(line for line in lines if line.startswith("data: {"))
            assert _complete(other, "r3").status_code == 200  # over budget while r1 streams: r2 goes
            assert set(_stored(served)) == {"kept", "r1", "r3"}
            chunks = [first, *(line for line in lines if line.startswith("data: {"))]
        text = "".join(json.loads(chunk.removeprefix("data: "))["choices"][0]["text"] for chunk in chunks)
        assert text == reference_text(adapter_dirs, PROMPT, "alpha", 200)
        assert _complete(http, "r2").status_code == 200  # resolved again; r1, idle and least recent, goes
        stored = _stored(served)
        assert set(stored) == {"kept", "r3", "r2"} and sum(stored.values()) <= BUDGET
        assert "r1" not in [card["id"] for card in http.get("/v1/models").json()["data"]]
        assert "loraserve:adapter_store_evictions_total 2.0" in http.get("/metrics").text


def test_concurrent_first_requests_over_budget_all_succeed_and_the_store_ends_in_budget(served, adapter_dirs):
    """Six names resolved at once into a store that holds three: the eviction passes overlap (each
    resolution runs one), and no request loses its adapter to another's pass between its resolution
    and its submission (ServerState.requesting), or fails on a name a concurrent pass unloaded. The
    store may hold more than its budget while more adapters are asked for at once than fit; the next
    resolution's pass brings it back."""
    expected = reference_text(adapter_dirs, PROMPT, "alpha", 2)

    def ask(name: str) -> tuple[int, str]:
        with httpx.Client(base_url=served.url, timeout=120) as http:
            response = _complete(http, name)
            return response.status_code, response.json()["choices"][0]["text"] if response.is_success else response.text

    with ThreadPoolExecutor(len(CONCURRENT)) as pool:
        answers = list(pool.map(ask, CONCURRENT))
    assert answers == [(200, expected)] * len(CONCURRENT)
    with httpx.Client(base_url=served.url, timeout=120) as http:
        assert _complete(http, "r1").status_code == 200  # evicted by the first test: resolved again
    stored = _stored(served)
    assert sum(stored.values()) <= BUDGET and {"kept", "r1"} <= set(stored)
