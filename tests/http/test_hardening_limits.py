"""No client can hold what other users need: analysis has its own bounded workers (429 past them),
bodies are bounded in bytes and time before parsing, prompts per request are capped, and slow
headers or bodies are cut off. Real HTTP and raw loopback sockets; every wait is bounded."""

from __future__ import annotations

import concurrent.futures
import socket
import time

import httpx
import pytest

from server.http.settings import Settings
from support.http import BASE, assert_openai_error, serve

pytestmark = pytest.mark.real_model

BIG = dict(r=64, lora_alpha=16, target_modules="all-linear")  # similarity takes ~1 s: it holds a worker
PAIRS = [
    ("big-a", "big-b"),
    ("big-b", "big-a"),
    ("big-a", "big-c"),
    ("big-c", "big-a"),
    ("big-b", "big-c"),
    ("big-c", "big-b"),
]
BODY_LIMIT = 64 * 1024
TIMEOUT_S = 1.0
WAIT_S = 30.0  # bound on any wait for the server to act


@pytest.fixture(scope="module")
def served(default_model, make_peft_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("big-adapters")
    adapters = [
        f"{name}={make_peft_adapter(default_model.model, root / name, **BIG)}" for name in ("big-a", "big-b", "big-c")
    ]
    settings = Settings(
        adapters=adapters,
        analysis_workers=1,
        max_queued_analyses=1,
        max_request_bytes=BODY_LIMIT,
        request_read_timeout=TIMEOUT_S,
        request_header_timeout=TIMEOUT_S,
        max_prompts_per_request=8,
        kv_cache_tokens=2048,
        max_num_seqs=4,
    )
    with serve(settings) as served:
        yield served


def _similarity(url: str, name: str, other: str) -> tuple[httpx.Response, float]:
    response = httpx.get(f"{url}/v1/adapters/{name}/similarity", params={"other": other}, timeout=120)
    return response, time.monotonic()


def test_analysis_is_bounded_and_never_delays_a_completion(served):
    with concurrent.futures.ThreadPoolExecutor(len(PAIRS) + 1) as pool:
        analyses = [pool.submit(_similarity, served.url, a, b) for a, b in PAIRS]
        completion = httpx.post(
            f"{served.url}/v1/completions", timeout=120, json={"model": BASE, "prompt": "Hello", "max_tokens": 1}
        )
        completed_at = time.monotonic()
        results = [future.result(timeout=120) for future in analyses]
    assert completion.status_code == 200, completion.text
    refused = [r for r, _ in results if r.status_code == 429]
    done = [(r, at) for r, at in results if r.status_code == 200]
    assert refused and done and len(refused) + len(done) == len(PAIRS), [r.status_code for r, _ in results]
    assert all(int(r.headers["retry-after"]) > 0 for r in refused)
    assert_openai_error(refused[0], 429, "analysis_workers")
    assert completed_at < max(at for _, at in done), "the completion waited for the analyses"


def test_a_similarity_is_computed_once_per_pair(served):
    analyses = served.app.state.adapter_analyses
    first, _ = _similarity(served.url, "big-a", "big-b")
    computed = analyses.num_similarities_computed
    again, _ = _similarity(served.url, "big-a", "big-b")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and analyses.num_similarities_computed == computed


def test_an_oversized_body_is_refused_before_it_is_read(served):
    body = b'{"model": "%s", "prompt": [%s]}' % (BASE.encode(), b",".join([b"1"] * BODY_LIMIT))
    response = httpx.post(
        f"{served.url}/v1/completions", content=body, timeout=WAIT_S, headers={"content-type": "application/json"}
    )
    assert_openai_error(response, 413, "max_request_bytes")
    assert httpx.get(f"{served.url}/health", timeout=WAIT_S).status_code == 200


def test_an_oversized_chunked_body_is_refused_mid_stream(served):
    sent = 0

    def chunks():
        nonlocal sent
        yield b'{"model": "%s", "prompt": "' % BASE.encode()
        for _ in range(1024):  # 16 MiB if it were all read
            sent += 16 * 1024
            yield b"a" * (16 * 1024)

    try:
        response = httpx.post(
            f"{served.url}/v1/completions",
            content=chunks(),
            timeout=WAIT_S,
            headers={"content-type": "application/json"},
        )
        assert_openai_error(response, 413, "max_request_bytes")
    except httpx.TransportError:  # the server answered and closed while the client was still sending
        pass
    assert sent < 16 * 1024 * 1024, "the whole body was read"


def test_too_many_prompts_are_a_400_naming_prompt(served):
    response = httpx.post(
        f"{served.url}/v1/completions", timeout=WAIT_S, json={"model": BASE, "prompt": ["Hi"] * 9, "max_tokens": 1}
    )
    error = assert_openai_error(response, 400, "max_prompts_per_request")
    assert error["param"] == "prompt"


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=WAIT_S)
    sock.settimeout(WAIT_S)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_a_slow_body_gets_408_and_the_connection_closes(served):
    with _connect(served.url) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"model":'
        )  # then nothing more
        answer = _read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_read_timeout" in answer


def test_slow_headers_are_cut_off(served):
    with _connect(served.url) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        assert _read_until_closed(sock) == b"", "closed without an answer"
