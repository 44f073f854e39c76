"""Error paths over raw HTTP: auth, malformed and invalid requests, context limits, a full queue,
unknown routes. Every error must leave as OpenAI's {"error": {"message", "type", "code"}} shape."""

from __future__ import annotations

import threading

import httpx
import pytest

from server.http.settings import Settings
from support.engine import wait_for_engine
from support.http import (
    BASE,
    adapter_files,
    assert_error_shape,
    assert_nothing_held,
    assert_openai_error,
    serve,
    wait_idle,
)

pytestmark = pytest.mark.real_model

API_KEY, ADMIN_KEY = "k", "a"
MAX_MODEL_LEN = 64


@pytest.fixture(scope="module")
def guarded():
    with serve(Settings(api_key=API_KEY, admin_key=ADMIN_KEY, max_model_len=MAX_MODEL_LEN)) as served:
        yield served


@pytest.fixture(scope="module")
def http(guarded):
    with httpx.Client(base_url=guarded.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client


def _body(**fields) -> dict:
    return {"model": BASE, "prompt": "Hello", "max_tokens": 2, "temperature": 0, **fields}


# Auth
@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/models"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/adapters"),
        ("DELETE", "/v1/adapters/x"),
        ("POST", "/v1/load_lora_adapter"),
    ],
)
def test_no_key_is_401(guarded, method, path):
    response = httpx.request(method, guarded.url + path, json={}, timeout=30)
    error = assert_openai_error(response, 401, "API key")
    assert error["code"] == "missing_api_key" and error["type"] == "authentication_error"
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Bearer wrong", "Bearer kk", f"Basic {API_KEY}", f"Bearer {API_KEY}x"])
def test_wrong_key_is_401(guarded, header):
    response = httpx.get(guarded.url + "/v1/models", headers={"Authorization": header}, timeout=30)
    assert_openai_error(response, 401, "API key")


@pytest.mark.parametrize("key", [API_KEY, ADMIN_KEY])
def test_either_key_may_read_and_generate(guarded, key):
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(guarded.url + "/v1/models", headers=headers, timeout=30).status_code == 200
    response = httpx.post(guarded.url + "/v1/completions", json=_body(max_tokens=1), headers=headers, timeout=60)
    assert response.status_code == 200, response.text


def test_only_the_admin_key_changes_adapters(guarded, adapter_dirs):
    files = adapter_files(adapter_dirs["alpha"])
    as_user = {"Authorization": f"Bearer {API_KEY}"}
    as_admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    response = httpx.post(
        guarded.url + "/v1/adapters", data={"name": "guarded"}, files=files, headers=as_user, timeout=60
    )
    assert_openai_error(response, 401, "invalid API key")
    assert httpx.get(guarded.url + "/v1/adapters", headers=as_user, timeout=30).json()["data"] == []

    response = httpx.post(
        guarded.url + "/v1/adapters", data={"name": "guarded"}, files=files, headers=as_admin, timeout=60
    )
    assert response.status_code == 201, response.text
    assert_openai_error(httpx.delete(guarded.url + "/v1/adapters/guarded", headers=as_user, timeout=30), 401)
    lora = {"lora_name": "x", "lora_path": "/tmp"}
    assert_openai_error(httpx.post(guarded.url + "/v1/load_lora_adapter", json=lora, headers=as_user, timeout=30), 401)
    assert_openai_error(
        httpx.post(guarded.url + "/v1/unload_lora_adapter", json=lora, headers=as_user, timeout=30), 401
    )
    assert httpx.delete(guarded.url + "/v1/adapters/guarded", headers=as_admin, timeout=30).status_code == 200


@pytest.mark.parametrize("path", ["/health", "/ready", "/openapi.json"])
def test_probes_need_no_key(guarded, path):
    assert httpx.get(guarded.url + path, timeout=30).status_code == 200


# Malformed and invalid requests
@pytest.mark.parametrize("content", [b"{bad", b'{"model": "x", ', b"\xff\xfe"])
def test_invalid_json_body_is_400(http, content):
    response = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400, "JSON")


@pytest.mark.parametrize("content", [b"[]", b'"text"', b"42"])
def test_a_body_that_is_not_an_object_is_400(http, content):
    response = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


@pytest.mark.parametrize(
    "path, change, field",
    [
        ("/v1/completions", {"temperature": 5}, "temperature"),
        ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"n": 0}, "n"),
        ("/v1/completions", {"n": 17}, "n"),
        ("/v1/completions", {"model": None}, "model"),
        ("/v1/completions", {"top_p": 0}, "top_p"),
        ("/v1/completions", {"logprobs": 21}, "logprobs"),
        ("/v1/completions", {"presence_penalty": 3}, "presence_penalty"),
        ("/v1/completions", {"prompt": None}, "prompt"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [[1, 2], []]}, "prompt"),
        ("/v1/completions", {"seed": 2**70}, "seed"),
        ("/v1/completions", {"seed": -(2**64)}, "seed"),
        ("/v1/completions", {"prompt": [99999999]}, "prompt"),
        ("/v1/completions", {"prompt": [-1], "echo": True}, "prompt"),
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "content"),
        ("/v1/chat/completions", {"temperature": -1}, "temperature"),
        ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ("/v1/chat/completions", {"max_completion_tokens": 0}, "max_completion_tokens"),
    ],
)
def test_invalid_field_is_400_naming_it(http, path, change, field):
    body = (
        _body(**change)
        if path == "/v1/completions"
        else {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **change}
    )
    if body.get("model", "") is None:
        del body["model"]
    if body.get("prompt", "") is None:
        del body["prompt"]
    error = assert_openai_error(http.post(path, json=body), 400, field)
    assert field in (error.get("param") or ""), error


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "hello " * 100}),
        ("/v1/completions", {"prompt": "hello", "max_tokens": MAX_MODEL_LEN}),
        ("/v1/completions", {"prompt": list(range(100, 100 + MAX_MODEL_LEN))}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 100}]}),
    ],
)
def test_prompt_longer_than_the_context_is_400(http, path, body):
    error = assert_openai_error(http.post(path, json={"model": BASE, **body}), 400, "context", str(MAX_MODEL_LEN))
    assert error["param"] == "prompt"


def test_context_limit_is_exact(http):
    """prompt + max_tokens == max_model_len fits; one more does not."""
    ids = list(range(1000, 1010))
    ok = http.post(
        "/v1/completions",
        json=_body(
            prompt=ids, max_tokens=MAX_MODEL_LEN - 10, ignore_eos=True, stop_token_ids=[2], logit_bias={"2": 100}
        ),
    )  # stops at once
    assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "stop", ok.text
    assert_openai_error(http.post("/v1/completions", json=_body(prompt=ids, max_tokens=MAX_MODEL_LEN - 9)), 400)


def test_a_bad_request_does_not_abort_others(guarded, http):
    """A token id outside the vocabulary is refused up front, never reaching (and failing) a shared step."""
    body = _body(prompt="Once upon a time", max_tokens=12, ignore_eos=True, stream=True)
    with http.stream("POST", "/v1/completions", json=body) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert_openai_error(http.post("/v1/completions", json=_body(prompt=[5, 10**7])), 400, "prompt")
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert '"finish_reason": "length"' in rest[-2], [first, *rest]
    wait_idle(guarded)
    assert_nothing_held(guarded.engine)


def test_unknown_model_is_404(http):
    error = assert_openai_error(http.post("/v1/completions", json=_body(model="nope")), 404, "nope")
    assert error["code"] == "model_not_found"


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/v1/nowhere", 404),
        ("POST", "/v2/completions", 404),
        ("GET", "/", 404),
        ("GET", "/v1/completions", 405),
        ("PUT", "/v1/models", 405),
    ],
)
def test_unknown_route_or_method_is_openai_shaped(http, method, path, status):
    assert_openai_error(http.request(method, path), status)


# A full queue
def test_full_queue_is_503_with_retry_after():
    """One running, one waiting: any further request is refused at once with Retry-After."""
    with serve(Settings(max_waiting=1, max_num_seqs=1)) as served:
        body = _body(prompt="Once upon a time", max_tokens=24, ignore_eos=True)
        response = httpx.post(served.url + "/v1/completions", json={**body, "n": 3}, timeout=120)
        error = assert_openai_error(response, 503, "waiting")
        assert error["code"] == "server_overloaded" and response.headers["retry-after"].isdigit()

        responses: list[httpx.Response | BaseException] = []

        def one():
            try:
                responses.append(httpx.post(served.url + "/v1/completions", json=body, timeout=120))
            except BaseException as exc:  # reported below, not lost in the thread
                responses.append(exc)

        threads = [threading.Thread(target=one) for _ in range(5)]
        threads[0].start()
        engine = served.engine
        wait_for_engine(engine, engine.has_unfinished, 120, "the first request reaching the engine")
        for thread in threads[1:]:  # arrive while the first is running
            thread.start()
        for thread in threads:
            thread.join(120)
        assert len(responses) == 5 and all(isinstance(r, httpx.Response) for r in responses), responses
        statuses = sorted(r.status_code for r in responses)
        assert statuses.count(200) >= 1 and statuses.count(503) >= 1 and set(statuses) <= {200, 503}, statuses
        for response in responses:
            if response.status_code == 503:
                assert response.headers["retry-after"].isdigit()
                assert assert_error_shape(response)["code"] == "server_overloaded"
            else:
                assert response.json()["choices"][0]["finish_reason"] == "length"
        wait_idle(served)
        assert_nothing_held(served.engine)
