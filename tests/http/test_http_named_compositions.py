"""Named compositions: POST /v1/adapters with a JSON `compose` body, then any client uses the name
as `model`: the same tokens as the per-request `adapters` field, listed in /v1/models, persisted in
the store across a restart, a 409 when deleting an adapter it uses, labelled by name in metrics,
and the Python client and CLI."""

from __future__ import annotations

import httpx
import pytest

from client import Client
from client.cli import _terms
from server.http.settings import Settings
from support.http import BASE, serve

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
COMPOSED = [{"name": "alpha", "scale": 1.5}, {"name": "beta", "scale": -1.0}]


def _settings(adapter_dirs, store) -> Settings:
    return Settings(
        adapters=[f"{n}={adapter_dirs[n]}" for n in ("alpha", "beta")], adapter_store=store, max_adapters_per_request=2
    )


def _complete(http: httpx.Client, model: str, adapters=None) -> str:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    response = http.post("/v1/completions", json=body | ({"adapters": adapters} if adapters else {}))
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def test_named_composition_end_to_end(adapter_dirs, tmp_path):
    store = tmp_path / "store"
    with serve(_settings(adapter_dirs, store)) as served, httpx.Client(base_url=served.url, timeout=120) as http:
        created = http.post("/v1/adapters", json={"name": "ab", "compose": COMPOSED})
        assert created.status_code == 201, created.text
        assert http.post("/v1/adapters", json={"name": "ab", "compose": COMPOSED}).status_code == 409
        unknown = http.post("/v1/adapters", json={"name": "x", "compose": [{"name": "nope", "scale": 1}]})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "compose[0].name"
        named, field = _complete(http, "ab"), _complete(http, BASE, COMPOSED)
        assert named == field != _complete(http, BASE), "the named composition is the request field's"
        card = next(m for m in http.get("/v1/models").json()["data"] if m["id"] == "ab")
        assert card["parent"] == BASE and card["compose"] == COMPOSED
        nested = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "adapters": [{"name": "ab"}]})
        assert nested.status_code == 400 and nested.json()["error"]["param"] == "adapters[0].name"
        in_use = http.delete("/v1/adapters/alpha")
        assert in_use.status_code == 409 and "'ab'" in in_use.json()["error"]["message"]
        assert 'adapter="ab"' in http.get("/metrics").text
        with Client(served.url) as client:
            client.compose("ba", _terms(["beta=0.5", "alpha"]))
            assert [m.compose for m in client.models() if m.id == "ba"] == [
                [{"name": "beta", "scale": 0.5}, {"name": "alpha", "scale": 1.0}]
            ]
            client.delete_adapter("ba")
            assert "ba" not in [m.id for m in client.models()]
    with serve(_settings(adapter_dirs, store)) as served, httpx.Client(base_url=served.url, timeout=120) as http:
        assert _complete(http, "ab") == named, "persisted in the store: served again after a restart"
        assert http.delete("/v1/adapters/ab").status_code == 200
        assert http.delete("/v1/adapters/alpha").status_code == 200
