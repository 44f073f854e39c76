"""Per-request composition over HTTP, through the official `openai` client on the real default
model: the `adapters` extension field (sent with `extra_body`) gives what the engine computes for
that composition alone, while a plain adapter request shares the batch; bad input is a typed error."""

from __future__ import annotations

import concurrent.futures

import httpx
import openai
import pytest

from server.http.settings import Settings
from support.http import BASE, openai_client, reference_text, serve

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"
NUM_TOKENS = 8
COMPOSED = [{"name": "alpha", "scale": 1.5}, {"name": "beta", "scale": -1.0}]
GREEDY = dict(temperature=0, max_tokens=NUM_TOKENS)


@pytest.fixture(scope="module")
def served(adapter_dirs):
    adapters = [f"{name}={adapter_dirs[name]}" for name in ("alpha", "beta")]
    with serve(Settings(adapters=adapters, max_adapters_per_request=2)) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    with openai_client(served) as client:
        yield client


def _complete(client, adapters=None, model=BASE):
    body = {"ignore_eos": True} | ({"adapters": adapters} if adapters is not None else {})
    return client.completions.create(model=model, prompt=PROMPT, extra_body=body, **GREEDY).choices[0].text


def test_composition_field_gives_the_engines_tokens_beside_a_plain_request(client, adapter_dirs):
    terms = tuple((t["name"], t["scale"]) for t in COMPOSED)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:  # in flight together: one batch, mixed rows
        composed = pool.submit(_complete, client, COMPOSED)
        plain = pool.submit(_complete, client, None, "alpha")
        base = pool.submit(_complete, client)
    assert composed.result() == reference_text(adapter_dirs, PROMPT, terms, NUM_TOKENS)
    assert plain.result() == reference_text(adapter_dirs, PROMPT, "alpha", NUM_TOKENS)
    assert len({composed.result(), plain.result(), base.result()}) == 3, "the composition must change the output"


def test_chat_takes_the_composition_field_too(client, adapter_dirs):
    messages = [{"role": "user", "content": "Name a colour."}]
    answer = client.chat.completions.create(
        model=BASE, messages=messages, extra_body={"adapters": COMPOSED, "ignore_eos": True}, **GREEDY
    )
    plain = client.chat.completions.create(model=BASE, messages=messages, extra_body={"ignore_eos": True}, **GREEDY)
    assert answer.choices[0].message.content != plain.choices[0].message.content


@pytest.mark.parametrize(
    "body, status, param",
    [
        (dict(adapters=[{"name": "nope", "scale": 1.0}]), 404, "adapters[0].name"),
        (dict(adapters=COMPOSED, model="alpha"), 400, "model"),
        (dict(adapters=COMPOSED * 2), 400, "adapters"),
        (dict(adapters=[]), 400, "adapters"),
        (dict(adapters=[{"name": "alpha", "weight": 1.0}]), 400, "adapters.0.weight"),
    ],
    ids=["unknown-name", "model-not-base", "over-the-limit", "empty", "unknown-key"],
)
def test_bad_compositions_are_typed_errors_naming_the_field(served, body, status, param):
    payload = {"model": BASE, "prompt": PROMPT, "max_tokens": 2} | body
    response = httpx.post(f"{served.url}/v1/completions", json=payload, timeout=60)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_non_finite_scale_is_a_400(served):
    response = httpx.post(
        f"{served.url}/v1/completions",
        timeout=60,
        headers={"content-type": "application/json"},
        content=f'{{"model": "{BASE}", "prompt": "x", "adapters": [{{"name": "alpha", "scale": NaN}}]}}',
    )
    assert response.status_code == 400, response.text


def test_unknown_name_through_the_client_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        _complete(client, [{"name": "nope"}])
