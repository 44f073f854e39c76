"""One authorised request cannot hurt another: scales past the dtype are refused (the merge that
overflows is tests/engine/test_step_isolation.py's), evicted adapters are read off the engine
thread, token-id fields are bounded, a stop cannot cut a tool call, and every sampling field is
honoured (logit_bias, min_p, min_tokens) or refused by name."""

from __future__ import annotations

import threading

import httpx
import pytest

import adapters.registry as registry_module
from server.http.settings import Settings
from support.http import BASE, assert_openai_error, openai_client, serve

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def served(adapter_dirs):
    settings = Settings(
        adapters=[f"{name}={path}" for name, path in adapter_dirs.items()],
        max_cpu_loras=0,
        kv_cache_tokens=4096,
        max_num_seqs=8,
    )
    with serve(settings) as served:
        yield served


def _complete(http: httpx.Client, **fields) -> httpx.Response:
    return http.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 8, **fields})


def test_a_scale_past_the_dtype_is_a_400_and_other_streams_go_on(served):
    with openai_client(served) as client, httpx.Client(base_url=served.url, timeout=120) as http:
        stream = client.completions.create(
            model="alpha", prompt=PROMPT, max_tokens=24, stream=True, extra_body={"ignore_eos": True}
        )
        chunks = iter(stream)
        first = next(chunks)
        bad = _complete(http, adapters=[{"name": "alpha", "scale": 1e300}])
        error = assert_openai_error(bad, 400, "scale")
        assert error["param"] == "adapters[0].scale"
        composed = http.post("/v1/adapters", json={"name": "huge", "compose": [{"name": "beta", "scale": 1e300}]})
        assert assert_openai_error(composed, 400)["param"] == "compose[0].scale"
        rest = list(chunks)
    text = first.choices[0].text + "".join(c.choices[0].text for c in rest if c.choices)
    assert rest[-1].choices[0].finish_reason == "length" and text


def test_an_evicted_adapter_is_read_off_the_engine_thread(served, monkeypatch):
    readers: list[str] = []
    real_load = registry_module.load_adapter

    def recording_load(*args, **kwargs):
        readers.append(threading.current_thread().name)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(registry_module, "load_adapter", recording_load)
    with httpx.Client(base_url=served.url, timeout=120) as http:
        for name in ("alpha", "beta", "gamma", "alpha"):  # max_cpu_loras=0: every request reads its file again
            assert http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 2}).is_success
    assert readers, "no adapter was read back: the test did not exercise eviction"
    assert "loraserve-engine" not in readers, readers


def test_token_id_fields_are_bounded_and_checked(served):
    with httpx.Client(base_url=served.url, timeout=120) as http:
        many = assert_openai_error(_complete(http, stop_token_ids=list(range(129))), 400, "max_stop_token_ids")
        assert many["param"] == "stop_token_ids"
        outside = assert_openai_error(_complete(http, stop_token_ids=[10**9]), 400, "vocabulary")
        assert outside["param"] == "stop_token_ids"
        bias = assert_openai_error(_complete(http, logit_bias={str(10**9): 1}), 400, "vocabulary")
        assert bias["param"] == "logit_bias"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("stop", [{"stop": ["}"]}, {"stop_token_ids": [17]}])
def test_a_stop_with_tool_calls_is_a_400_naming_it(served, stream, stop):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {
        "model": BASE,
        "messages": [{"role": "user", "content": "Call f"}],
        "tools": tools,
        "tool_choice": "required",
        "stream": stream,
        **stop,
    }
    with httpx.Client(base_url=served.url, timeout=120) as http:
        error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400, "tool call")
    assert error["param"] == next(iter(stop))


def test_logit_bias_min_p_and_min_tokens_are_honoured(served):
    tokenizer = served.engine.tokenizer
    with httpx.Client(base_url=served.url, timeout=120) as http:
        forced = _complete(http, temperature=0, max_tokens=1, logit_bias={"42": 100}).json()
        assert forced["choices"][0]["text"] == tokenizer.decode([42])
        sampled = _complete(http, temperature=1.0, seed=7, min_p=1.0, max_tokens=6).json()["choices"][0]["text"]
        assert sampled == _complete(http, temperature=0, max_tokens=6).json()["choices"][0]["text"]
        first_id = _greedy_first_id(http, tokenizer)
        unheld = _complete(http, temperature=0, max_tokens=6, stop_token_ids=[first_id]).json()
        assert unheld["usage"]["completion_tokens"] == 1 and unheld["choices"][0]["finish_reason"] == "stop"
        held = _complete(http, temperature=0, max_tokens=6, stop_token_ids=[first_id], min_tokens=3).json()
        assert held["usage"]["completion_tokens"] >= 3


def _greedy_first_id(http: httpx.Client, tokenizer) -> int:
    """The greedy first token's id: the one token the prompt's encoding gains with its text."""
    text = _complete(http, temperature=0, max_tokens=1).json()["choices"][0]["text"]
    before, after = tokenizer.encode(PROMPT), tokenizer.encode(PROMPT + text)
    assert after[: len(before)] == before and len(after) == len(before) + 1, (before, after)
    return after[-1]


@pytest.mark.parametrize(
    "field",
    [
        {"best_of": 2},
        {"use_beam_search": True},
        {"length_penalty": 0.5},
        {"suffix": "!"},
        {"include_stop_str_in_output": True},
    ],
)
def test_unserved_sampling_fields_are_refused_by_name(served, field):
    with httpx.Client(base_url=served.url, timeout=120) as http:
        error = assert_openai_error(_complete(http, **field), 400)
    assert error["param"] == next(iter(field))
