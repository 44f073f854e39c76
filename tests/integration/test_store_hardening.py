"""A store that holds bad or hostile entries still serves the good ones, through real HTTP: a bad
composition file is skipped (not a crash loop of every replica), a link planted in the store is never
followed, load_lora_adapter refuses files linked out of --adapter-root, and a delete keeps the version
readable for the grace period a replace gives readers on other replicas."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest

from server.http.settings import Settings
from server.store import AdapterStore
from support.http import adapter_files, serve

pytestmark = pytest.mark.real_model

BAD_COMPOSITIONS = {
    "no-scale": [{"name": "alpha"}],
    "not-json": "{",
    "not-a-list": {"name": "alpha", "scale": 1},
    "infinite": [{"name": "alpha", "scale": "Infinity"}],
    "bad-name": [{"name": "../alpha", "scale": 1}],
}


def _seed_store(store_dir: Path, adapter_dirs: dict[str, Path], victim: Path) -> None:
    store = AdapterStore(store_dir)
    store.save("alpha", {f: data for f, (_, data) in adapter_files(adapter_dirs["alpha"]).items()})
    folder = store_dir / ".compositions"
    folder.mkdir()
    (folder / "good-mix.json").write_text(json.dumps([{"name": "alpha", "scale": 0.5}]))
    for name, body in BAD_COMPOSITIONS.items():
        text = body if isinstance(body, str) else json.dumps(body).replace('"Infinity"', "Infinity")
        (folder / f"{name}.json").write_text(text)
    victim.mkdir()
    (victim / "keep.txt").write_text("outside the store")
    os.symlink(os.path.relpath(victim, store_dir), store_dir / "evil")


@pytest.fixture(scope="module")
def hostile_store(adapter_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    store_dir, victim, adapter_root = root / "store", root / "victim", root / "adapter-root"
    store_dir.mkdir()
    _seed_store(store_dir, adapter_dirs, victim)
    adapter_root.mkdir()
    linked = adapter_root / "linked"
    linked.mkdir()
    shutil.copy(adapter_dirs["beta"] / "adapter_config.json", linked)
    os.symlink(adapter_dirs["beta"] / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    settings = Settings(adapter_store=store_dir, adapter_root=adapter_root, kv_cache_tokens=2048, max_num_seqs=4)
    with serve(settings) as served:
        yield served, store_dir, victim, adapter_root


def test_bad_composition_files_are_skipped_and_the_good_ones_serve(hostile_store):
    served, *_ = hostile_store
    with httpx.Client(base_url=served.url, timeout=120) as http:
        assert http.get("/health").status_code == 200
        ids = {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert {"alpha", "good-mix"} <= ids and not ids & set(BAD_COMPOSITIONS)
        answer = http.post("/v1/completions", json={"model": "good-mix", "prompt": "Hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text
        for name in BAD_COMPOSITIONS:
            assert http.post("/v1/completions", json={"model": name, "prompt": "Hi"}).status_code == 404


def test_a_link_out_of_the_store_is_neither_listed_nor_followed_by_delete(hostile_store):
    served, store_dir, victim, _ = hostile_store
    with httpx.Client(base_url=served.url, timeout=120) as http:
        assert "evil" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert http.delete("/v1/adapters/evil").status_code == 404
    assert (victim / "keep.txt").read_text() == "outside the store"
    store = AdapterStore(store_dir)
    assert store.current("evil") is None and "evil" not in store.names()


def test_load_lora_adapter_refuses_a_file_linked_out_of_the_adapter_root(hostile_store):
    served, _, _, adapter_root = hostile_store
    with httpx.Client(base_url=served.url, timeout=120) as http:
        body = {"lora_name": "linked", "lora_path": str(adapter_root / "linked")}
        refused = http.post("/v1/load_lora_adapter", json=body)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error["param"] == "lora_path" and "adapter_model.safetensors" in error["message"]
        assert "linked" not in {m["id"] for m in http.get("/v1/models").json()["data"]}


def test_delete_keeps_the_version_readable_for_the_grace_period(hostile_store, adapter_dirs):
    served, store_dir, _, _ = hostile_store
    with httpx.Client(base_url=served.url, timeout=120) as http:
        created = http.post("/v1/adapters", data={"name": "short-lived"}, files=adapter_files(adapter_dirs["gamma"]))
        assert created.status_code == 201, created.text
        version_dir = AdapterStore(store_dir).current("short-lived")
        assert http.delete("/v1/adapters/short-lived").status_code == 200
        assert http.post("/v1/completions", json={"model": "short-lived", "prompt": "Hi"}).status_code == 404
    expected = (adapter_dirs["gamma"] / "adapter_model.safetensors").read_bytes()
    assert (version_dir / "adapter_model.safetensors").read_bytes() == expected, "a replica may be reading it"
    AdapterStore(store_dir, grace_s=0)  # a sweep past the grace period collects it
    assert not version_dir.exists()
