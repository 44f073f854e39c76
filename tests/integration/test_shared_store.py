"""Two replicas on one adapter store (the ReadWriteMany volume of deploy/base/pvc.yaml).

An adapter uploaded, replaced or deleted through one replica is what the other serves: each replica
here is a real app under uvicorn with its own freshly loaded default model, sharing only the directory.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from server.engine.model_loader import load_base_model
from server.http.app import create_app
from server.http.settings import Settings
from server.store import AdapterStore
from support.servers import serve_in_thread

pytestmark = pytest.mark.real_model

BASE = "SmolLM2-135M-Instruct"
NAME = "shared-lora"
LORA_KWARGS = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PROMPT, MAX_TOKENS = "The best way to learn a language is", 12


def replica(store: Path):
    """One replica's app: its own model; a small KV cache, since two of them share this machine."""
    settings = Settings(adapter_store=store, kv_cache_tokens=1024, max_num_seqs=4)
    return serve_in_thread(create_app(settings, base=load_base_model()))


def upload(client: httpx.Client, weights: Path, replace: bool = False) -> httpx.Response:
    files = {f: (f, (weights / f).read_bytes()) for f in ADAPTER_FILES}
    return client.post("/v1/adapters", data={"name": NAME, "replace": str(replace).lower()}, files=files)


def complete(client: httpx.Client, model: str) -> httpx.Response:
    return client.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True},
    )


def greedy_text(client: httpx.Client, model: str) -> str:
    response = complete(client, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def model_ids(client: httpx.Client) -> set[str]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return {card["id"] for card in response.json()["data"]}


def test_replicas_follow_upload_replace_and_delete_through_the_store(tmp_path, default_model, make_peft_adapter):
    # Seeded by directory name: two different sets of weights with the same shapes (and so file size).
    v1, v2 = (make_peft_adapter(default_model.model, tmp_path / f"weights-{v}", **LORA_KWARGS) for v in ("v1", "v2"))
    store = tmp_path / "store"
    with ExitStack() as stack:
        url_a, url_b = stack.enter_context(replica(store)), stack.enter_context(replica(store))
        a = stack.enter_context(httpx.Client(base_url=url_a, timeout=120.0))
        b = stack.enter_context(httpx.Client(base_url=url_b, timeout=120.0))
        base_text = greedy_text(b, BASE)
        assert greedy_text(a, BASE) == base_text

        assert upload(a, v1).status_code == 201
        assert NAME in model_ids(b)  # listed by B before B ever served it
        text_v1 = greedy_text(a, NAME)
        assert text_v1 != base_text, "the adapter does not change the output: the test proves nothing"
        assert greedy_text(b, NAME) == text_v1

        response = upload(a, v2, replace=True)
        assert response.status_code == 201, response.text
        text_v2 = greedy_text(a, NAME)
        assert text_v2 != text_v1, "the new weights give the same output: the test proves nothing"
        assert greedy_text(b, NAME) == text_v2
        assert NAME in model_ids(b)

        assert a.delete(f"/v1/adapters/{NAME}").status_code == 200
        response = complete(b, NAME)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["message"]
        assert NAME not in model_ids(b)
        assert b.get(f"/v1/adapters/{NAME}").status_code == 404
        assert greedy_text(b, BASE) == base_text


def test_store_version_changes_on_replace_even_when_the_timestamp_does_not(tmp_path):
    """A replace keeps the size (same shapes); on a filesystem with coarse timestamps (1 s on some NFS
    servers) it can keep the mtime too. Replicas compare versions, so the version must still change."""
    store = AdapterStore(tmp_path / "store")
    store.save(NAME, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights-1"})
    before, old_mtime = store.version(NAME), (store.path(NAME) / "adapter_model.safetensors").stat().st_mtime_ns
    store.save(NAME, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"weights-2"}, replace=True)
    weights = store.path(NAME) / "adapter_model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, old_mtime))  # what a coarse clock would have written
    assert weights.stat().st_size == 9 and weights.read_bytes() == b"weights-2"
    assert store.version(NAME) != before
    store.delete(NAME)
    assert store.version(NAME) is None
