"""What leaves the server is well formed (issue 24, item 9): an adapter whose activations overflow
fails alone with a typed 422, and logprobs are never null past an echoed first token."""

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
from support.http import BASE, assert_openai_error, reference_text, serve, wait_idle
from support.peft import make_overflowing_adapter

pytestmark = pytest.mark.real_model

PROMPT = "Once upon a time"
NUM_TOKENS = 6


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, adapter_dirs) -> dict[str, Path]:
    """An overflowing copy of alpha."""
    base = tmp_path_factory.mktemp("outputs")
    return {"huge": make_overflowing_adapter(adapter_dirs["alpha"], base / "huge")}


@pytest.fixture(scope="module")
def served(dirs, adapter_dirs):
    settings = Settings(adapters=[f"alpha={adapter_dirs['alpha']}", f"huge={dirs['huge']}"])
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
