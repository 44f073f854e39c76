"""What leaves the server is well formed, and names mean one thing (issue 24, items 4, 7, 9): an
adapter whose activations overflow fails alone with a typed 422, logprobs are never null past an
echoed first token, a name is one adapter or one composition (across unload and restart), and a
client-given path or name the filesystem cannot hold is a 400 naming its field, never a 500."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.engine.sequence import TokenLogprob
from server.http.serving import LOGPROB_FLOOR, chat_logprobs, completion_logprobs
from server.http.settings import Settings
from server.store import COMPOSITIONS, AdapterStore
from support.http import BASE, adapter_files, assert_openai_error, reference_text, serve, wait_idle
from support.peft import make_overflowing_adapter

pytestmark = pytest.mark.real_model

PROMPT = "Once upon a time"
NUM_TOKENS = 6
LONG = "a" * 300  # past NAME_MAX (255 bytes) of every common filesystem


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, adapter_dirs) -> dict[str, Path]:
    """An overflowing copy of alpha; an adapter root; a store written by an older version, which let
    the composition `legacy` take the name of the stored adapter `legacy` (gamma's weights)."""
    base = tmp_path_factory.mktemp("outputs")
    store = AdapterStore(base / "store")
    store.save("legacy", {name: data for name, (_, data) in adapter_files(adapter_dirs["gamma"]).items()})
    (base / "store" / COMPOSITIONS).mkdir()
    (base / "store" / COMPOSITIONS / "legacy.json").write_text(json.dumps([{"name": "alpha", "scale": 1.0}]))
    (base / "root").mkdir()
    huge = make_overflowing_adapter(adapter_dirs["alpha"], base / "huge")
    return {"huge": huge, "store": base / "store", "root": base / "root"}


@pytest.fixture(scope="module")
def served(dirs, adapter_dirs):
    settings = Settings(
        adapters=[f"alpha={adapter_dirs['alpha']}", f"huge={dirs['huge']}"],
        adapter_store=dirs["store"],
        adapter_root=dirs["root"],
    )
    with serve(settings) as served:
        yield served


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def _complete(http: httpx.Client, model: str, **fields) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True}
    return http.post("/v1/completions", json=body | fields)


def _chat(http: httpx.Client, model: str, **fields) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": NUM_TOKENS}
    return http.post("/v1/chat/completions", json=body | {"temperature": 0} | fields)


# Non-finite outputs (item 9)
def test_an_overflowing_adapter_is_a_typed_422_naming_it(http, served):
    for response in (
        _complete(http, "huge"),
        _complete(http, "huge", echo=True, logprobs=1, max_tokens=0),  # prompt scores only
        _chat(http, "huge", logprobs=True, top_logprobs=2),
    ):
        error = assert_openai_error(response, 422, "'huge'", "not finite")
        assert (error["code"], error["param"]) == ("non_finite_output", "model")
    with http.stream("POST", "/v1/completions", json={"model": "huge", "prompt": PROMPT, "stream": True}) as stream:
        events = [line[5:].strip() for line in stream.iter_lines() if line.startswith("data:")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "non_finite_output"
    wait_idle(served)


def test_requests_beside_it_get_what_they_get_alone(http, served, adapter_dirs):
    """Sent together, so they share steps with the failing row."""
    with ThreadPoolExecutor(4) as pool:
        failing = [pool.submit(_complete, http, "huge") for _ in range(2)]
        others = {model: pool.submit(_complete, http, model) for model in ("alpha", BASE)}
        assert all(f.result().status_code == 422 for f in failing)
        for model, future in others.items():
            response = future.result()
            assert response.status_code == 200, response.text
            expected = reference_text(adapter_dirs, PROMPT, None if model == BASE else model, NUM_TOKENS)
            assert response.json()["choices"][0]["text"] == expected, model
    wait_idle(served)


def test_logprobs_are_numbers_but_for_an_echoed_first_token(http):
    echoed = _complete(http, "alpha", echo=True, logprobs=2).json()["choices"][0]["logprobs"]
    assert echoed["token_logprobs"][0] is None and echoed["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in echoed["token_logprobs"][1:])
    chat = _chat(http, "alpha", logprobs=True, top_logprobs=2).json()["choices"][0]["logprobs"]["content"]
    values = [entry["logprob"] for entry in chat] + [t["logprob"] for entry in chat for t in entry["top_logprobs"]]
    assert values and all(isinstance(v, float) for v in values)


def test_a_logprob_of_minus_infinity_is_reported_as_openais_floor():
    """A top alternative of probability 0: JSON has no -inf, and null breaks OpenAI's chat schema."""
    scored = [TokenLogprob(5, None, []), TokenLogprob(6, -math.inf, [(7, -math.inf), (8, -1.0)])]
    legacy = completion_logprobs(scored, str)
    assert legacy.token_logprobs == [None, LOGPROB_FLOOR]
    assert legacy.top_logprobs == [None, {"6": LOGPROB_FLOOR, "7": LOGPROB_FLOOR, "8": -1.0}]
    chat = chat_logprobs(scored[1:], str).content[0]
    assert (chat.logprob, [t.logprob for t in chat.top_logprobs]) == (LOGPROB_FLOOR, [LOGPROB_FLOOR, -1.0])
    assert LOGPROB_FLOOR == -9999.0  # OpenAI's own


# One namespace (item 7)
def test_a_stored_adapter_keeps_its_name_while_unloaded(http, served, adapter_dirs):
    assert (
        http.post("/v1/adapters", data={"name": "kept"}, files=adapter_files(adapter_dirs["beta"])).status_code == 201
    )
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "kept"}).status_code == 200
    compose = {"name": "kept", "compose": [{"name": "alpha", "scale": 1}]}
    for body in (compose, compose | {"replace": True}):
        error = assert_openai_error(http.post("/v1/adapters", json=body), 409, "'kept'", "adapter")
        assert (error["code"], error["param"]) == ("name_in_use", "name")
    assert http.get("/v1/adapters/kept").status_code == 200
    assert _complete(http, "kept").json()["choices"][0]["text"] == reference_text(
        adapter_dirs, PROMPT, "beta", NUM_TOKENS
    )
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids.count("kept") == 1
    assert http.delete("/v1/adapters/kept").status_code == 200
    wait_idle(served)


def test_an_unloaded_stored_name_cannot_be_loaded_from_a_path(http, served, dirs, adapter_dirs):
    files = adapter_files(adapter_dirs["beta"])
    assert http.post("/v1/adapters", data={"name": "stored-beta"}, files=files).status_code == 201
    assert http.post("/v1/unload_lora_adapter", json={"lora_name": "stored-beta"}).status_code == 200
    on_disk = dirs["root"] / "alpha-copy"
    on_disk.mkdir(exist_ok=True)
    for name, (_, data) in adapter_files(adapter_dirs["alpha"]).items():
        (on_disk / name).write_bytes(data)
    load = {"lora_name": "stored-beta", "lora_path": str(on_disk)}
    assert_openai_error(http.post("/v1/load_lora_adapter", json=load), 409, "stored-beta")
    text = _complete(http, "stored-beta").json()["choices"][0]["text"]
    assert text == reference_text(adapter_dirs, PROMPT, "beta", NUM_TOKENS)
    assert http.delete("/v1/adapters/stored-beta").status_code == 200
    wait_idle(served)


def test_an_upload_cannot_take_a_compositions_name_even_with_replace(http, served, adapter_dirs):
    created = http.post("/v1/adapters", json={"name": "mixed", "compose": [{"name": "alpha", "scale": 0.5}]})
    assert created.status_code == 201, created.text
    files = adapter_files(adapter_dirs["beta"])
    assert_openai_error(http.post("/v1/adapters", data={"name": "mixed", "replace": "true"}, files=files), 409)
    assert "mixed" not in served.state.store
    assert http.delete("/v1/adapters/mixed").status_code == 200


def test_a_store_with_a_name_twice_serves_and_lists_it_once(http, served, adapter_dirs):
    """Written by an older version: the adapter keeps the name, the composition is ignored."""
    ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids.count("legacy") == 1
    assert http.get("/v1/adapters/legacy").status_code == 200
    assert _complete(http, "legacy").json()["choices"][0]["text"] == reference_text(
        adapter_dirs, PROMPT, "gamma", NUM_TOKENS
    )
    assert "legacy" not in served.state.compositions
    wait_idle(served)


# Paths and names past the filesystem's limits (item 4)
@pytest.mark.parametrize("where", ["component", "parent", "whole"])
def test_a_lora_path_the_filesystem_cannot_hold_is_a_400_naming_it(http, dirs, where):
    root = dirs["root"]
    path = {"component": root / LONG, "parent": root / LONG / "adapter", "whole": root.joinpath(*["b" * 200] * 25)}
    load = {"lora_name": f"long-{where}", "lora_path": str(path[where])}
    error = assert_openai_error(http.post("/v1/load_lora_adapter", json=load), 400, "lora_path")
    assert error["param"] == "lora_path"


def test_a_lora_path_that_does_not_exist_is_a_400_naming_it(http, dirs):
    load = {"lora_name": "nothing", "lora_path": str(dirs["root"] / "nothing-here")}
    error = assert_openai_error(http.post("/v1/load_lora_adapter", json=load), 400, "does not exist")
    assert error["param"] == "lora_path"


def test_a_name_the_store_cannot_hold_is_a_400_naming_it(http, adapter_dirs):
    upload = http.post("/v1/adapters", data={"name": LONG}, files=adapter_files(adapter_dirs["beta"]))
    assert assert_openai_error(upload, 400)["param"] == "name"
    compose = http.post("/v1/adapters", json={"name": LONG, "compose": [{"name": "alpha", "scale": 1}]})
    assert assert_openai_error(compose, 400)["param"] == "name"
    for response in (http.get(f"/v1/adapters/{LONG}"), http.delete(f"/v1/adapters/{LONG}"), _complete(http, LONG)):
        assert_openai_error(response, 404)
