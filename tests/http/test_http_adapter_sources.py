"""Adapters resolved on first request from configured sources, through real HTTP: a directory tree,
moto's S3 server on loopback (boto3 over HTTP, its GETs counted) and a hub cache read offline.
Every answer is compared with the engine alone serving the same adapter files, and the concurrent
first requests (one server, two replicas) with PEFT's own `generate` too."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server.http.settings import Settings
from support.http import adapter_files, assert_openai_error, reference_text, serve, wait_stored
from support.peft import peft_greedy_text
from support.sources import CountingS3, put_adapter, read_adapter, s3_server, write_hub_cache

pytestmark = pytest.mark.real_model

BUCKET, PREFIX = "loras", "team"
MAX_UPLOAD = 3_000_000  # one real adapter is ~1.9 MB
TIMEOUT_S = 2.0
PROMPT = "Once upon a time"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def s3(adapter_dirs):
    with s3_server(BUCKET) as (_, app):
        alpha, beta = read_adapter(adapter_dirs["alpha"]), read_adapter(adapter_dirs["beta"])
        for name, files in {
            "s3-alpha": alpha,
            "s3-beta": beta,
            "s3-gamma": read_adapter(adapter_dirs["gamma"]),
            "s3-truncated": {**alpha, WEIGHTS: alpha[WEIGHTS][: len(alpha[WEIGHTS]) // 2]},
            "s3-huge": {**alpha, WEIGHTS: alpha[WEIGHTS] + b"\0" * MAX_UPLOAD},
            "stalled-one": alpha,
        }.items():
            put_adapter(BUCKET, PREFIX, name, files)
        yield app


@pytest.fixture(scope="module")
def served(s3, adapter_dirs, tmp_path_factory):
    base = tmp_path_factory.mktemp("sources")
    shutil.copytree(adapter_dirs["gamma"], base / "tree" / "dir-gamma")
    write_hub_cache(base / "hub", "acme/hub-beta", read_adapter(adapter_dirs["beta"]))
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "HF_HUB_CACHE")}
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(base / "hub"))
    settings = Settings(
        adapter_source=[str(base / "tree"), f"s3://{BUCKET}/{PREFIX}", "hf://acme"],
        adapter_store=base / "store",
        adapter_source_timeout=TIMEOUT_S,
        adapter_source_negative_ttl=60,
        adapter_source_in_load=True,
        max_upload_bytes=MAX_UPLOAD,
    )
    try:
        with serve(settings) as served:
            served.store_root = base / "store"
            yield served
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def _complete(http: httpx.Client, model: str, max_tokens: int = 4) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return http.post("/v1/completions", json=body)


@pytest.mark.parametrize(("model", "same_as"), [("dir-gamma", "gamma"), ("hub-beta", "beta")])
def test_first_request_resolves_from_a_directory_tree_and_the_hub_cache(served, http, adapter_dirs, model, same_as):
    response = _complete(http, model)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == reference_text(adapter_dirs, PROMPT, same_as, 4)
    wait_stored(served)
    assert model in [card["id"] for card in http.get("/v1/models").json()["data"]]
    card = http.get(f"/v1/adapters/{model}").json()
    assert card["resolved_from"].endswith("tree" if model == "dir-gamma" else "hf://acme") and card["persisted"]


def test_32_concurrent_first_requests_fetch_once_and_answer_as_uploaded(served, http, s3, adapter_dirs, default_model):
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda _: _complete(http, "s3-beta"), range(32)))
    assert [r.status_code for r in responses] == [200] * 32, responses[0].text
    expected = reference_text(adapter_dirs, PROMPT, "beta", 4)
    assert expected == peft_greedy_text(default_model, adapter_dirs["beta"], PROMPT, 4)
    assert {r.json()["choices"][0]["text"] for r in responses} == {expected}
    assert s3.count(f"/{PREFIX}/s3-beta/{WEIGHTS}") == 1
    wait_stored(served)
    assert (served.store_root / "s3-beta" / WEIGHTS).read_bytes() == (adapter_dirs["beta"] / WEIGHTS).read_bytes()
    assert _complete(http, "s3-beta").status_code == 200 and s3.count(f"/{PREFIX}/s3-beta/") == 2  # config + weights
    metrics = http.get("/metrics").text
    assert (
        f'loraserve:adapter_source_resolutions_total{{outcome="resolved",source="s3://{BUCKET}/{PREFIX}"}}' in metrics
    )


@pytest.mark.parametrize("model", ["../s3-alpha", "team/s3-alpha", "..", "s3-alpha/../s3-beta"])
def test_names_that_are_paths_are_404_without_touching_a_source(http, s3, model):
    before = sum(s3.gets.values())
    assert_openai_error(_complete(http, model), 404)
    assert sum(s3.gets.values()) == before


def test_a_name_found_nowhere_is_404_and_remembered(http, s3):
    error = assert_openai_error(_complete(http, "nowhere"), 404, "nowhere")
    assert error["code"] == "model_not_found"
    looked = s3.count("/nowhere/")
    assert looked == 2  # both files asked for at once (one round trip, not two), each once
    assert_openai_error(_complete(http, "nowhere"), 404)
    assert s3.count("/nowhere/") == looked, "the negative cache should have answered"


def test_a_truncated_object_is_422_naming_the_file_and_an_oversized_one_413(http):
    error = assert_openai_error(_complete(http, "s3-truncated"), 422, WEIGHTS)
    assert error["code"] == "invalid_adapter"
    assert_openai_error(_complete(http, "s3-huge"), 413, "max_upload_bytes")
    assert "s3-truncated" not in [card["id"] for card in http.get("/v1/models").json()["data"]]


def test_a_hanging_source_is_503_with_retry_after_while_a_stream_finishes(http, s3, adapter_dirs):
    assert _complete(http, "dir-gamma").status_code == 200
    body = {"model": "dir-gamma", "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    texts: list[str] = []

    def stream() -> None:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            chunks = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: {")]
            texts.append("".join(json.loads(chunk)["choices"][0]["text"] for chunk in chunks))

    streamer = threading.Thread(target=stream)
    streamer.start()
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:  # waiters share the one attempt: none waits a timeout per waiter
        responses = list(pool.map(lambda _: _complete(http, f"{CountingS3.stall.strip('/')}one"), range(4)))
    elapsed = time.monotonic() - started
    streamer.join(120)
    for response in responses:
        assert_openai_error(response, 503, "adapter_source_timeout")
        assert response.headers["Retry-After"]
    assert elapsed < TIMEOUT_S + 2 and s3.count(CountingS3.stall) == 2  # one attempt: its two GETs at once
    assert texts == [reference_text(adapter_dirs, PROMPT, "gamma", 24)]


def test_load_lora_adapter_takes_a_configured_source_uri_only(http, adapter_dirs):
    loaded = http.post(
        "/v1/load_lora_adapter", json={"lora_name": "loaded", "lora_path": f"s3://{BUCKET}/{PREFIX}/s3-alpha"}
    )
    assert loaded.status_code == 200, loaded.text
    assert _complete(http, "loaded").json()["choices"][0]["text"] == reference_text(adapter_dirs, PROMPT, "alpha", 4)
    elsewhere = {"lora_name": "other", "lora_path": "s3://another-bucket/s3-alpha"}
    assert_openai_error(http.post("/v1/load_lora_adapter", json=elsewhere), 400, "configured adapter source")


def test_replicas_on_one_store_fetch_once_between_them(served, http, s3, adapter_dirs, default_model):
    assert _complete(http, "s3-alpha").status_code == 200
    fetched = s3.count(f"/{PREFIX}/s3-alpha/")
    settings = Settings(adapter_source=[f"s3://{BUCKET}/{PREFIX}"], adapter_store=served.store_root)
    with serve(settings) as replica, httpx.Client(base_url=replica.url, timeout=120) as other:
        (source,) = replica.state.resolver.sources
        assert source._client is not None, "boto3's client is built at startup, not in a first request"
        response = _complete(other, "s3-alpha")  # what a restart does too
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == reference_text(adapter_dirs, PROMPT, "alpha", 4)
        with ThreadPoolExecutor(32) as pool:  # 16 first requests on each replica at once
            responses = list(pool.map(lambda i: _complete((http, other)[i % 2], "s3-gamma"), range(32)))
    assert s3.count(f"/{PREFIX}/s3-alpha/") == fetched
    assert [r.status_code for r in responses] == [200] * 32, responses[0].text
    assert {r.json()["choices"][0]["text"] for r in responses} == {
        peft_greedy_text(default_model, adapter_dirs["gamma"], PROMPT, 4)
    }
    assert s3.count(f"/{PREFIX}/s3-gamma/{WEIGHTS}") == 1


def test_check_base_refuses_an_adapter_trained_on_another_base(served, http, s3, adapter_dirs):
    files = read_adapter(adapter_dirs["alpha"])
    config = json.loads(files["adapter_config.json"]) | {"base_model_name_or_path": "someone/else-7B"}
    put_adapter(BUCKET, PREFIX, "s3-foreign", {**files, "adapter_config.json": json.dumps(config).encode()})
    served.state.settings.adapter_source_check_base = True
    try:
        error = assert_openai_error(_complete(http, "s3-foreign"), 422, "base_model_name_or_path", "else-7B")
    finally:
        served.state.settings.adapter_source_check_base = False
    assert error["code"] == "incompatible_adapter"


def test_resolved_adapters_go_through_the_uploads_compression(served, http, s3, adapter_dirs):
    """--adapter-source-max-rank compresses every resolved adapter as an upload's max_rank does
    (byte for byte the same stored files, the same answer), and load_lora_adapter's own max_rank
    compresses one loaded by source URI."""
    uploaded = http.post(
        "/v1/adapters", data={"name": "up-alpha-r2", "max_rank": "2"}, files=adapter_files(adapter_dirs["alpha"])
    )
    assert uploaded.status_code == 201, uploaded.text
    put_adapter(BUCKET, PREFIX, "s3-alpha-r2", read_adapter(adapter_dirs["alpha"]))
    served.state.settings.adapter_source_max_rank = 2
    try:
        resolved = _complete(http, "s3-alpha-r2")
    finally:
        served.state.settings.adapter_source_max_rank = None
    assert resolved.status_code == 200, resolved.text
    assert resolved.json()["choices"][0]["text"] == _complete(http, "up-alpha-r2").json()["choices"][0]["text"]
    assert http.get("/v1/adapters/s3-alpha-r2").json()["rank"] == 2
    wait_stored(served)
    for file_name in ("adapter_config.json", WEIGHTS):
        stored = (served.store_root / "s3-alpha-r2" / file_name).read_bytes()
        assert stored == (served.store_root / "up-alpha-r2" / file_name).read_bytes()
    body = {"lora_name": "loaded-r2", "lora_path": f"s3://{BUCKET}/{PREFIX}/s3-alpha", "max_rank": 2}
    assert http.post("/v1/load_lora_adapter", json=body).status_code == 200
    assert http.get("/v1/adapters/loaded-r2").json()["rank"] == 2


def test_a_first_requests_log_line_says_how_long_it_waited_for_resolution(http, s3, adapter_dirs, caplog):
    put_adapter(BUCKET, PREFIX, "s3-logged", read_adapter(adapter_dirs["beta"]))
    with caplog.at_level(logging.INFO, logger="loraserve.requests"):
        assert _complete(http, "s3-logged").status_code == 200
        assert _complete(http, "s3-logged").status_code == 200
    lines = [r for r in caplog.records if r.name == "loraserve.requests" and "adapter=s3-logged" in r.getMessage()]
    assert len(lines) == 2, [r.getMessage() for r in caplog.records]
    first, second = lines
    waited = first.fields["resolve_time"]
    assert waited > 0 and f"resolve={waited:.3f}s" in first.getMessage()
    assert second.fields["resolve_time"] is None and "resolve=" not in second.getMessage()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux's")
def test_a_resolved_adapters_store_write_runs_at_the_lowest_priority(served, http, s3, adapter_dirs, monkeypatch):
    """The adapter is served from memory first, so its store write is background work: at nice 19 it
    takes no CPU from the parse and the steps beside it (it doubled the parse at normal priority)."""
    put_adapter(BUCKET, PREFIX, "s3-background", read_adapter(adapter_dirs["gamma"]))
    niceness, save = [], served.state.store.save

    def observed_save(*args, **kwargs):
        niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return save(*args, **kwargs)

    monkeypatch.setattr(served.state.store, "save", observed_save)
    assert _complete(http, "s3-background").status_code == 200
    wait_stored(served)
    assert niceness == [19]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) != 19


def test_a_resolved_adapters_store_write_starts_once_a_step_has_run_it(served, http, s3, adapter_dirs, monkeypatch):
    """Beside the adapter's first step, the write's page-cache copy and fsync delayed its first token
    (25-50 ms on the dev box): the write waits until a step has loaded the adapter into its slot."""
    put_adapter(BUCKET, PREFIX, "s3-after-step", read_adapter(adapter_dirs["gamma"]))
    ran_first, save, registry = [], served.state.store.save, served.state.engine.registry

    def observed_save(*args, **kwargs):
        ran_first.append(registry.was_loaded("s3-after-step"))
        return save(*args, **kwargs)

    monkeypatch.setattr(served.state.store, "save", observed_save)
    assert _complete(http, "s3-after-step").status_code == 200
    wait_stored(served)
    assert ran_first == [True]


def test_a_first_request_is_answered_before_its_store_write_lands(served, http, s3, adapter_dirs, monkeypatch):
    """A resolved adapter is served from memory once valid; the store's write lands after (held here
    until released) and only then is it persisted, its registration reading back from the store. A
    DELETE meanwhile waits for the write, so it cannot bring back what was deleted."""
    put_adapter(BUCKET, PREFIX, "s3-slow-disk", read_adapter(adapter_dirs["alpha"]))
    release, save = threading.Event(), served.state.store.save

    def held_save(*args, **kwargs):
        assert release.wait(60), "the test never released the store's write"
        return save(*args, **kwargs)

    monkeypatch.setattr(served.state.store, "save", held_save)
    try:
        response = _complete(http, "s3-slow-disk")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == reference_text(adapter_dirs, PROMPT, "alpha", 4)
        assert not http.get("/v1/adapters/s3-slow-disk").json()["persisted"]
        assert served.state.storing == {"s3-slow-disk"}
    finally:
        release.set()
    wait_stored(served)
    assert http.get("/v1/adapters/s3-slow-disk").json()["persisted"]
    assert served.engine.registry.version("s3-slow-disk").source == served.state.store.current("s3-slow-disk")

    release.clear()
    put_adapter(BUCKET, PREFIX, "s3-deleted", read_adapter(adapter_dirs["beta"]))
    try:
        assert _complete(http, "s3-deleted").status_code == 200
        with ThreadPoolExecutor(1) as pool:
            deleting = pool.submit(http.delete, "/v1/adapters/s3-deleted")
            time.sleep(0.2)  # the DELETE has reached the server and is waiting for the write
            assert not deleting.done()
            release.set()
            assert deleting.result().status_code == 200
    finally:
        release.set()
    wait_stored(served)
    assert not (served.store_root / "s3-deleted").exists()
    assert "s3-deleted" not in [card["id"] for card in http.get("/v1/models").json()["data"]]


def test_a_store_write_that_fails_leaves_the_adapter_served_from_memory(
    served, http, s3, adapter_dirs, caplog, monkeypatch
):
    put_adapter(BUCKET, PREFIX, "s3-full-disk", read_adapter(adapter_dirs["gamma"]))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(served.state.store, "save", full_disk)
    expected = reference_text(adapter_dirs, PROMPT, "gamma", 4)
    with caplog.at_level(logging.ERROR, logger="server.http.state_sources"):
        response = _complete(http, "s3-full-disk")
        wait_stored(served)
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected
    assert "storing it failed" in caplog.text and "No space left" in caplog.text
    assert not http.get("/v1/adapters/s3-full-disk").json()["persisted"]
    again = _complete(http, "s3-full-disk")
    assert again.status_code == 200 and again.json()["choices"][0]["text"] == expected
    assert s3.count(f"/{PREFIX}/s3-full-disk/{WEIGHTS}") == 1, "served from memory, not fetched again"
