"""Prompt logprobs (SamplingParams.prompt_logprobs) against a direct HF/PEFT forward of the same
model and adapter: whole prefill, chunked prefill, a preempted and recomputed request, and
max_tokens 0 (score the prompt, sample nothing)."""

from __future__ import annotations

import pytest
import torch

from server.engine.adapter_ref import AdapterRef
from server.engine.sampling_params import SamplingParams
from support.engine import (
    BASE,
    PROMPTS,
    encode,
    fresh_model,
    greedy,
    hf_logprobs,
    make_engine,
    peft_reference,
    run_steps,
)

LONG_PROMPT = " ".join(PROMPTS * 6)  # ~100 tokens: several chunks at a small token budget
TOP_N = 3


@torch.no_grad()
def peft_logprobs(reference, token_ids: list[int], adapter: str | None) -> torch.Tensor:
    """log_softmax of a plain PEFT forward with `adapter` (None = base): [len(token_ids), V]."""
    ids = torch.tensor([token_ids])
    logits = reference(input_ids=ids, adapter_names=[adapter or BASE]).logits[0]
    return torch.log_softmax(logits.float(), -1)


def assert_matches(prompt_logprobs, prompt_ids: list[int], reference: torch.Tensor) -> None:
    """reference: [T, V] log_softmax; row i - 1 scores prompt token i."""
    assert len(prompt_logprobs) == len(prompt_ids)
    first = prompt_logprobs[0]
    assert (first.token_id, first.logprob, first.top) == (prompt_ids[0], None, [])
    for i, lp in enumerate(prompt_logprobs[1:], start=1):
        row = reference[i - 1]
        assert lp.token_id == prompt_ids[i]
        assert lp.logprob == pytest.approx(float(row[prompt_ids[i]]), abs=1e-4)
        top = torch.topk(row, TOP_N)
        assert [t for t, _ in lp.top] == top.indices.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_prompt_logprobs_equal_a_peft_forward_per_adapter(adapter_paths):
    engine = make_engine(adapter_paths)
    adapters = [None, "a", "b"]
    params = greedy(2, prompt_logprobs=TOP_N)
    completions = engine.generate([PROMPTS[0]] * 3, params, adapters)
    reference = peft_reference(adapter_paths)
    ids = encode(PROMPTS[0])
    for adapter, completion in zip(adapters, completions):
        assert_matches(completion.prompt_logprobs, ids, peft_logprobs(reference, ids, adapter))
    values = {tuple(lp.logprob for lp in c.prompt_logprobs[1:]) for c in completions}
    assert len(values) == 3, "each adapter must change the scores, or the test proves nothing"


def test_chunked_prefill_scores_every_prompt_token_once(adapter_paths):
    engine = make_engine(adapter_paths, max_num_batched_tokens=7)
    ids = encode(LONG_PROMPT)
    seq = engine.add_request(ids, greedy(3, prompt_logprobs=TOP_N), AdapterRef.named("a"))
    other = engine.add_request(PROMPTS[1], greedy(20), AdapterRef.named("b"))  # shares the steps, asks for nothing
    outputs = run_steps(engine)
    assert len(ids) > 7 * 5
    assert_matches(seq.prompt_logprobs, ids, peft_logprobs(peft_reference(adapter_paths), ids, "a"))
    delivered = [lp for out in outputs[seq.request_id] for lp in out.prompt_logprobs]
    assert delivered == seq.prompt_logprobs
    assert other.prompt_logprobs == [] and all(not o.prompt_logprobs for o in outputs[other.request_id])


def test_a_preempted_request_is_scored_once(adapter_paths):
    ids = encode(LONG_PROMPT)
    engine = make_engine(adapter_paths, kv_cache_tokens=256, max_num_batched_tokens=16)
    hog = engine.add_request(PROMPTS[0], greedy(180), AdapterRef.named("b"))
    seq = engine.add_request(ids, greedy(60, prompt_logprobs=TOP_N), AdapterRef.named("a"))
    run_steps(engine)
    assert seq.num_preemptions > 0, "the test must preempt the scored request"
    assert hog.finish_reason == seq.finish_reason == "length"
    assert_matches(seq.prompt_logprobs, ids, peft_logprobs(peft_reference(adapter_paths), ids, "a"))


def test_max_tokens_zero_scores_the_prompt_and_samples_nothing():
    engine = make_engine()
    ids = encode(PROMPTS[2])
    seq = engine.add_request(ids, SamplingParams(max_tokens=0, prompt_logprobs=0))
    outputs = run_steps(engine)[seq.request_id]
    assert len(outputs) == 1 and outputs[0].finished and outputs[0].finish_reason == "length"
    assert outputs[0].token_ids == [] and outputs[0].text == "" and seq.output_token_ids == []
    reference = hf_logprobs(fresh_model(), ids)
    assert [lp.logprob for lp in outputs[0].prompt_logprobs][1:] == pytest.approx(
        [float(reference[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-4
    )
    assert all(lp.top == [] for lp in outputs[0].prompt_logprobs)


def test_a_one_token_prompt_has_only_the_empty_first_entry():
    engine = make_engine()
    (completion,) = engine.generate([[42]], greedy(2, prompt_logprobs=1))
    assert [(lp.token_id, lp.logprob) for lp in completion.prompt_logprobs] == [(42, None)]
    assert len(completion.token_ids) == 2


def test_requests_that_do_not_ask_get_none():
    (completion,) = make_engine().generate([PROMPTS[0]], greedy(2))
    assert completion.prompt_logprobs is None
