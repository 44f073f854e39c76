"""Completions with `echo` and `logprobs` score the prompt (as vLLM and lm-eval's local-completions
expect), through the official `openai` client, against a direct HF/PEFT forward of the same adapter."""

from __future__ import annotations

import copy

import httpx
import pytest
import torch
from peft import PeftModel

from support.http import (
    BASE,
    CROSS_KERNELS_ULPS,
    SAME_KERNELS_ULPS,
    assert_openai_error,
    fp32_tolerance,
    openai_client,
)

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is Paris, and the capital of Italy is", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def served(alpha_server):
    return alpha_server  # one server per settings profile (tests/conftest.py)


@pytest.fixture(scope="module")
def client(served):
    with openai_client(served) as client:
        yield client


@pytest.fixture(scope="module")
def reference(default_model, adapter_dirs):
    """name -> [T, V] log_softmax of a plain HF forward (PEFT for the adapter) of a prompt's ids."""
    peft = PeftModel.from_pretrained(copy.deepcopy(default_model.model), str(adapter_dirs["alpha"])).eval()

    @torch.no_grad()
    def logprobs(model: str, ids: list[int]) -> torch.Tensor:
        net = peft if model == "alpha" else default_model.model
        return torch.log_softmax(net(torch.tensor([ids])).logits[0].float(), -1)

    return logprobs


@pytest.mark.parametrize("model", [BASE, "alpha"])
def test_echo_logprobs_score_token_id_prompts_as_hf_does(client, default_model, reference, model):
    """lm-eval's exact request: a batch of token-id prompts, echo, logprobs 1, max_tokens 1."""
    batch = [default_model.tokenizer.encode(p) for p in PROMPTS]
    response = client.completions.create(model=model, prompt=batch, echo=True, logprobs=1, max_tokens=1, temperature=0)
    for choice in response.choices:
        ids, lp = batch[choice.index], choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        expected = reference(model, ids)
        hf_scores = [float(expected[i - 1, ids[i]]) for i in range(1, len(ids))]
        tolerance = fp32_tolerance(hf_scores + [float(expected.abs().max())], CROSS_KERNELS_ULPS)
        assert lp.token_logprobs[1 : len(ids)] == pytest.approx(hf_scores, abs=tolerance)
        for i in range(1, len(ids)):  # the chosen token plus the top 1, as vLLM returns them
            top = lp.top_logprobs[i]
            assert lp.tokens[i] in top and 1 <= len(top) <= 2
            assert max(top.values()) == pytest.approx(float(expected[i - 1].max()), abs=tolerance)
        assert choice.text.startswith(default_model.tokenizer.decode(ids))
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
        assert response.usage.completion_tokens == 2


def test_max_tokens_zero_with_echo_scores_the_prompt_only(client, default_model):
    scored = client.completions.create(model="alpha", prompt=PROMPTS[0], echo=True, logprobs=0, max_tokens=0)
    (choice,) = scored.choices
    num_prompt = len(default_model.tokenizer.encode(PROMPTS[0]))
    assert choice.text == PROMPTS[0] and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == num_prompt and scored.usage.completion_tokens == 0
    with_token = client.completions.create(
        model="alpha", prompt=PROMPTS[0], echo=True, logprobs=0, max_tokens=1, temperature=0
    )
    scores, again = choice.logprobs.token_logprobs, with_token.choices[0].logprobs.token_logprobs[:num_prompt]
    tolerance = fp32_tolerance(scores, SAME_KERNELS_ULPS)  # lm_head on one row more: other kernels' sums
    assert again[0] is None and again[1:] == pytest.approx(scores[1:], abs=tolerance)


def test_max_tokens_zero_without_echo_is_refused(served):
    response = httpx.post(
        f"{served.url}/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 0}, timeout=60
    )
    assert assert_openai_error(response, 400, "echo")["param"] == "max_tokens"


def test_streamed_echo_logprobs_equal_the_whole_response(client):
    params = dict(
        model="alpha",
        prompt=PROMPTS,
        echo=True,
        logprobs=2,
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    whole = {c.index: c for c in client.completions.create(**params).choices}
    text, values, offsets = {0: "", 1: ""}, {0: [], 1: []}, {0: [], 1: []}
    for chunk in client.completions.create(stream=True, **params):
        for choice in chunk.choices:
            text[choice.index] += choice.text
            values[choice.index] += choice.logprobs.token_logprobs
            offsets[choice.index] += choice.logprobs.text_offset
    for index, choice in whole.items():
        assert text[index] == choice.text
        whole_values = choice.logprobs.token_logprobs  # the batches differ: kernel noise only
        tolerance = fp32_tolerance(whole_values, SAME_KERNELS_ULPS)
        assert values[index][0] is None and values[index][1:] == pytest.approx(whole_values[1:], abs=tolerance)
        assert offsets[index] == choice.logprobs.text_offset
