"""The edge holds against hostile clients (issue 24): the key is checked before a byte of the body is
read, large bodies are parsed off the event loop, client text and numbers are validated where they
enter (lone surrogates, look-alike digits, booleans as token ids, unbounded floats), inputs the model
cannot see are refused by name, and a 5xx closes its connection instead of leaving it to die under
the next request."""

from __future__ import annotations

import json
import socket
import threading
from urllib.parse import urlsplit

import httpx
import pytest

import server.http.json_body as json_body
from server.http.settings import Settings
from support.http import BASE, assert_openai_error, serve

pytestmark = pytest.mark.real_model

API_KEY, ADMIN_KEY = "user-key", "admin-key"
USER = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def guarded():
    # A read timeout far past the test's own: a 401 that waited for the body would come as a 408.
    with serve(Settings(api_key=API_KEY, admin_key=ADMIN_KEY, request_read_timeout=120, max_model_len=256)) as served:
        yield served


@pytest.fixture(scope="module")
def http(guarded):
    with httpx.Client(base_url=guarded.url, headers=USER, timeout=120) as client:
        yield client


def _raw_request(url: str, head: str, body_part: bytes) -> tuple[str, bytes]:
    """Send `head` and the first bytes of a body that never completes; return the status line and
    the whole response (the server must answer without the rest, and close)."""
    host = urlsplit(url)
    with socket.create_connection((host.hostname, host.port), timeout=60) as sock:
        sock.sendall(head.encode() + body_part)
        response = b""
        while chunk := sock.recv(65536):  # until the server closes: the refusal ends the connection
            response += chunk
    return response.split(b"\r\n", 1)[0].decode(), response


@pytest.mark.parametrize(
    "path, key",
    [
        ("/v1/completions", None),
        ("/v1/chat/completions", "wrong"),
        ("/v1/adapters", None),  # a multipart upload streams to its route otherwise
        ("/v1/load_lora_adapter", API_KEY),  # the user key is no admin key: refused at the edge too
    ],
)
def test_a_request_without_the_key_is_refused_before_its_body_is_read(guarded, path, key):
    # Content-Length promises 4 MB; 16 bytes come. A server that read the body would wait for the rest.
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    content_type = "multipart/form-data; boundary=x" if path == "/v1/adapters" else "application/json"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\n{auth}Content-Type: {content_type}\r\nContent-Length: 4000000\r\n\r\n"
    )
    status, response = _raw_request(guarded.url, head, b'{"model": "x", "')
    assert status.split()[1] == "401", response[:300]
    assert b"connection: close" in response.lower()
    assert b"api key" in response.lower()


def test_a_large_body_is_parsed_off_the_event_loop(http, monkeypatch):
    parsers: list[str] = []
    real_parse = json_body.parse_json

    def recording_parse(body):
        parsers.append(threading.current_thread().name)
        return real_parse(body)

    monkeypatch.setattr(json_body, "parse_json", recording_parse)
    padding = "x" * (2 * json_body.INLINE_PARSE_BYTES)  # an ignored field makes the body large
    response = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2, "pad": padding})
    assert response.status_code == 200, response.text
    small = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2})
    assert small.status_code == 200, small.text
    # The small body was parsed on the server's event loop thread; the large one anywhere else.
    assert len(parsers) == 2 and parsers[0] != parsers[1], parsers


SURROGATE = '"\\ud800"'  # JSON text for a lone UTF-16 surrogate: valid JSON syntax, no Unicode text


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", f'{{"model": "{BASE}", "prompt": {SURROGATE}}}'),
        ("/v1/completions", f'{{"model": {SURROGATE}, "prompt": "hi"}}'),
        ("/v1/chat/completions", f'{{"model": "{BASE}", "messages": [{{"role": "user", "content": {SURROGATE}}}]}}'),
        ("/v1/chat/completions", f'{{"model": "{BASE}", "messages": [{{"role": "user", "content": "a\\udc00b"}}]}}'),
        ("/v1/completions", '{"model": "x", "prompt": ' + "[" * 3000 + "]" * 3000 + "}"),
        ("/v1/completions", b'{"model": "x", "prompt": "\xff\xfe"}'),  # not UTF-8
    ],
)
def test_text_that_is_not_unicode_is_a_400_and_the_connection_lives_on(http, path, body):
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, "not valid JSON")
    assert error["code"] == "invalid_json"
    assert "connection" not in response.headers or response.headers["connection"] != "close"
    again = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2})
    assert again.status_code == 200, again.text  # the same keep-alive connection still serves


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"logit_bias": {"٣": 1}}, "logit_bias"),
        ({"logit_bias": {"１": 1}}, "logit_bias"),
        ({"prompt": [True, False]}, "prompt"),
        ({"prompt": [1.0, 2.0]}, "prompt"),
        ({"prompt": [[1, True]]}, "prompt"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"repetition_penalty": 1e300}, "repetition_penalty"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
    ],
)
def test_loosely_typed_or_unbounded_numbers_are_a_400_naming_the_field(http, fields, param):
    response = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2, **fields})
    error = assert_openai_error(response, 400)
    assert error["param"] == param or error["param"].startswith(param), error


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_non_finite_numbers_are_a_400(http, literal):
    body = f'{{"model": "{BASE}", "prompt": "hi", "max_tokens": 2, "repetition_penalty": {literal}}}'
    response = http.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert_openai_error(response, 400)


def test_a_seed_at_the_top_of_its_range_serves_every_choice(http):
    response = http.post(
        "/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 4, "n": 3, "seed": 2**63 - 1}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 3


def test_an_image_part_is_refused_by_name(http):
    content = [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]
    response = http.post(
        "/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": content}]}
    )
    error = assert_openai_error(response, 400, "image_url", "text only")
    assert error["param"] == "messages[0].content[1].type"


def test_top_logprobs_without_logprobs_is_refused(http):
    messages = [{"role": "user", "content": "Hi"}]
    response = http.post("/v1/chat/completions", json={"model": BASE, "messages": messages, "top_logprobs": 3})
    assert assert_openai_error(response, 400, "logprobs")["param"] == "top_logprobs"
    served = http.post(
        "/v1/chat/completions",
        json={"model": BASE, "messages": messages, "top_logprobs": 3, "logprobs": True, "max_tokens": 2},
    )
    assert served.status_code == 200 and len(served.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 3


def test_a_server_fault_closes_its_connection(guarded, http):
    def fault():
        raise RuntimeError("a fault no client input can cause")

    guarded.app.add_api_route("/test-fault", fault, methods=["GET"])
    response = http.get("/test-fault")
    assert_openai_error(response, 500)
    assert response.headers["connection"] == "close"
    again = http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2})
    assert again.status_code == 200  # the client opened a new connection: it was told to


def test_invalid_json_names_the_problem(http):
    response = http.post("/v1/completions", content=b'{"model": ', headers={"Content-Type": "application/json"})
    error = assert_openai_error(response, 400, "not valid JSON")
    assert json.dumps(error)  # and the body itself is valid JSON
