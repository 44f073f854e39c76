"""An adapter whose weights are finite but overflow the activations: its requests fail alone with a
typed error naming it, for sampled tokens and for prompt scores, and every other row of the same
step samples what it samples alone."""

from __future__ import annotations

import pytest
import torch

from server.engine.adapter_ref import AdapterRef
from server.engine.errors import NonFiniteOutputError
from server.engine.sampler import non_finite_rows
from support.engine import PROMPTS, assert_released, encode, greedy, make_engine, run_steps
from support.peft import make_overflowing_adapter

NUM_TOKENS = 6


@pytest.fixture
def engine(adapter_paths, tmp_path):
    huge = make_overflowing_adapter(adapter_paths["a"], tmp_path / "huge")
    return make_engine({**adapter_paths, "huge": huge})


def _alone(engine, prompt: str, adapter: str | None) -> list[int]:
    return engine.generate([encode(prompt)], greedy(NUM_TOKENS), [adapter])[0].token_ids


def _assert_failed_naming(seq, *words: str) -> None:
    assert seq.finish_reason == "abort" and isinstance(seq.error, NonFiniteOutputError), seq.error
    assert seq.output_token_ids == []
    for word in words:
        assert word in str(seq.error)


def test_non_finite_logits_fail_their_request_alone(engine):
    plain = [(PROMPTS[0], None), (PROMPTS[1], "a"), (PROMPTS[2], "b")]
    expected = [_alone(engine, prompt, adapter) for prompt, adapter in plain]
    others = [engine.add_request(encode(p), greedy(NUM_TOKENS), AdapterRef.of(a)) for p, a in plain]
    huge = engine.add_request(encode(PROMPTS[3]), greedy(NUM_TOKENS, logprobs=2), AdapterRef.of("huge"))
    outputs = run_steps(engine)
    _assert_failed_naming(huge, "'huge'", "not finite", "float32")
    assert huge.error.field == "model"
    assert outputs[huge.request_id][-1].error is huge.error  # what the HTTP layer raises
    assert [seq.output_token_ids for seq in others] == expected
    assert_released(engine)


def test_non_finite_prompt_scores_fail_the_request(engine):
    scored = engine.add_request(encode(PROMPTS[0]), greedy(0, prompt_logprobs=2), AdapterRef.of("huge"))
    scored_and_sampled = engine.add_request(encode(PROMPTS[1]), greedy(2, prompt_logprobs=0), AdapterRef.of("huge"))
    beside = engine.add_request(encode(PROMPTS[2]), greedy(0, prompt_logprobs=2), AdapterRef.of("a"))
    run_steps(engine)
    for seq in (scored, scored_and_sampled):
        _assert_failed_naming(seq, "'huge'")
        assert all(lp.logprob is None or torch.isfinite(torch.tensor(lp.logprob)) for lp in seq.prompt_logprobs)
    assert (beside.finish_reason, beside.error) == ("length", None)
    assert len(beside.prompt_logprobs) == len(encode(PROMPTS[2]))
    assert_released(engine)


def test_a_composition_with_non_finite_logits_is_named_by_its_adapters(engine):
    seq = engine.add_request(encode(PROMPTS[0]), greedy(2), AdapterRef.composed((("a", 1.0), ("huge", 1.0))))
    run_steps(engine)
    _assert_failed_naming(seq, "composition of 'a', 'huge'")
    assert seq.error.field == "adapters"


def test_non_finite_rows_names_only_the_rows_at_fault():
    logits = torch.zeros(4, 8)  # [B, V]
    assert non_finite_rows(logits) == []
    logits[1, 3], logits[3, 0] = float("nan"), float("-inf")
    assert non_finite_rows(logits) == [1, 3]
