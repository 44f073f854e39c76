"""The official `openai` client against the live server: whatever works with OpenAI works here unchanged.

Greedy outputs are compared with the non-streamed response and with `LLMEngine.generate` alone on a
fresh model with the same adapter, so a wrong adapter, a lost delta or a leaked stop string fails.
"""

from __future__ import annotations

import gc
import json
import weakref

import httpx
import openai
import pytest

from server.http.settings import Settings
from support.http import BASE, assert_error_shape, openai_client, reference_chat_prompt, reference_text, serve

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
PROMPTS = [PROMPT, "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})
NUM_TOKENS = 8


@pytest.fixture(scope="module")
def served(alpha_server):
    return alpha_server  # one server per settings profile (tests/conftest.py)


@pytest.fixture(scope="module")
def client(served):
    with openai_client(served) as client:
        yield client


def _complete(client, model=BASE, prompt=PROMPT, max_tokens=NUM_TOKENS, **kwargs):
    return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, **{**GREEDY, **kwargs})


def _chat(client, model=BASE, messages=CHAT, max_tokens=NUM_TOKENS, **kwargs):
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **{**GREEDY, **kwargs})


def test_completion_stream_concatenates_to_the_whole_text(client):
    whole = _complete(client)
    assert whole.object == "text_completion" and whole.model == BASE
    (choice,) = whole.choices
    assert choice.text and choice.finish_reason == "length"
    assert (whole.usage.completion_tokens, whole.usage.prompt_tokens) == (NUM_TOKENS, 5)

    chunks = list(_complete(client, stream=True, stream_options={"include_usage": True}))
    *deltas, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in deltas) == choice.text
    assert deltas[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in deltas[:-1])
    assert len({c.id for c in chunks}) == 1
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump() == whole.usage.model_dump()


def test_chat_stream_concatenates_to_the_whole_message(client):
    whole = _chat(client)
    assert whole.object == "chat.completion"
    (choice,) = whole.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and whole.usage.completion_tokens == NUM_TOKENS

    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    *deltas, usage_chunk = chunks
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == choice.message.content
    assert deltas[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert usage_chunk.choices == [] and usage_chunk.usage.model_dump() == whole.usage.model_dump()


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(_complete(client, max_tokens=3, stream=True))
    assert chunks and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": CHAT}),
    ],
)
def test_raw_sse_is_well_formed_and_ends_with_done(served, path, body):
    """What the client library hides: every event is `data: <json>`, and the last is [DONE]."""
    request = {"model": BASE, "max_tokens": 3, "temperature": 0, "ignore_eos": True, "stream": True, **body}
    response = httpx.post(served.url + path, json=request, timeout=120)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and response.text.endswith("data: [DONE]\n\n")
    for event in events[:-1]:
        assert event.startswith("data: ")
        json.loads(event[len("data: ") :])


def test_adapter_output_differs_from_base_and_equals_the_engine(client, adapter_dirs):
    base = [c.text for c in _complete(client, prompt=PROMPTS).choices]  # a prompt list: one batch
    adapted = [c.text for c in _complete(client, model="alpha", prompt=PROMPTS).choices]
    assert base != adapted, "the adapter changed nothing: the test would prove nothing"
    assert adapted == [reference_text(adapter_dirs, p, "alpha", NUM_TOKENS) for p in PROMPTS]
    assert base == [reference_text(adapter_dirs, p, None, NUM_TOKENS) for p in PROMPTS]


def test_chat_with_adapter_equals_the_engine(client, adapter_dirs):
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    reply = _chat(client, model="alpha", messages=messages).choices[0].message.content
    expected = reference_text(adapter_dirs, reference_chat_prompt(adapter_dirs, messages), "alpha", NUM_TOKENS)
    assert reply == expected
    assert reply != _chat(client, messages=messages).choices[0].message.content


def test_chat_content_parts_read_as_their_text(client):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": " of France?"}]  # an image: 400
    as_parts = _chat(client, messages=[{"role": "user", "content": parts}], max_tokens=4)
    assert as_parts.choices[0].message.content == _chat(client, max_tokens=4).choices[0].message.content


def test_n2_with_seed_is_reproducible_and_streams_the_same(client):
    params = dict(n=2, max_tokens=6, temperature=1.0, seed=1234, extra_body={"ignore_eos": True})
    first = client.completions.create(model=BASE, prompt=PROMPT, **params)
    again = client.completions.create(model=BASE, prompt=PROMPT, **params)
    texts = {c.index: c.text for c in first.choices}
    assert sorted(texts) == [0, 1]
    assert texts == {c.index: c.text for c in again.choices}
    assert texts[0] != texts[1], "n choices must not be copies of one another"
    assert first.usage.completion_tokens == 12 and first.usage.prompt_tokens == 5

    streamed = {0: "", 1: ""}
    for chunk in client.completions.create(model=BASE, prompt=PROMPT, stream=True, **params):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == texts


def test_completion_logprobs(client):
    choice = _complete(client, max_tokens=4, logprobs=2).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(4)]
    for token, value, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert 1 <= len(top) <= 2 and value <= 0.0
        assert value == pytest.approx(max(top.values()), abs=1e-5)  # greedy picks the most likely
        assert top.get(token) == pytest.approx(value, abs=1e-5)


def test_chat_logprobs(client):
    response = _chat(client, max_tokens=4, logprobs=True, top_logprobs=2)
    content = response.choices[0].logprobs.content
    assert len(content) == 4
    assert "".join(t.token for t in content) == response.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0.0
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert bytes(entry.bytes) == entry.token.encode()


def test_no_logprobs_unless_asked(client):
    assert _complete(client, max_tokens=2).choices[0].logprobs is None
    assert _chat(client, max_tokens=2).choices[0].logprobs is None


def test_stop_string_ends_the_text_and_is_not_included(client):
    full = _complete(client, max_tokens=12).choices[0].text
    stop = full.split()[1]  # a word that starts after the first one, so the kept text is not empty
    expected = full[: full.index(stop)]
    assert expected

    choice = _complete(client, max_tokens=12, stop=[stop]).choices[0]
    assert (choice.text, choice.finish_reason) == (expected, "stop")

    chunks = list(_complete(client, max_tokens=12, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert all(stop not in c.choices[0].text for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_stop_string(client):
    full = _chat(client, max_tokens=12).choices[0].message.content
    stop = full.split()[1]
    choice = _chat(client, max_tokens=12, stop=[stop]).choices[0]
    assert (choice.message.content, choice.finish_reason) == (full[: full.index(stop)], "stop")


def test_models_list_has_base_and_adapter_with_parent(client):
    models = {m.id: m.model_dump() for m in client.models.list().data}
    assert set(models) == {BASE, "alpha"}
    assert models[BASE].get("parent") is None
    assert models["alpha"]["parent"] == BASE
    assert models["alpha"]["object"] == "model" and models["alpha"]["rank"] == 8


@pytest.mark.parametrize("kind", ["completion", "chat", "completion-stream", "chat-stream"])
def test_unknown_model_is_not_found(client, kind):
    call = _complete if kind.startswith("completion") else _chat
    with pytest.raises(openai.NotFoundError) as caught:
        call(client, model="no-such-adapter", max_tokens=2, stream=kind.endswith("stream"))
    assert caught.value.status_code == 404
    error = assert_error_shape(caught.value.response)
    assert error["code"] == "model_not_found" and "no-such-adapter" in error["message"]
    assert caught.value.body["code"] == "model_not_found"  # the client unwraps {"error": ...} itself


def test_a_stopped_app_frees_its_engine_and_model():
    """Nothing process-wide (FastAPI's endpoint caches, Prometheus, threads) may keep a stopped
    app's engine alive: a process that builds several apps would otherwise hold a model each."""
    with serve(Settings()) as served:
        for path in ("/metrics", "/ready", "/health", "/v1/models"):
            assert httpx.get(served.url + path, timeout=30).status_code == 200  # every endpoint once
        engine = weakref.ref(served.engine)
        model = weakref.ref(served.engine.lora_model.model)
    del served
    gc.collect()
    assert engine() is None and model() is None
