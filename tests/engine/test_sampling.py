"""Sampling parameters: validation into typed errors, and their effect through the engine."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode

from server.engine.adapter_ref import BASE_REF
from server.engine.errors import RequestError
from server.engine.sampler import sample, seeded_uniform
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence
from support.engine import PROMPTS, encode, fresh_model, greedy, hf_logprobs, make_engine, run_steps

REPEATING = "1 2 3 4 5"  # the tiny model's greedy continuation repeats one token several times


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=-2), "top_k"),
        (dict(logprobs=21), "logprobs"),
        (dict(max_tokens=-1), "max_tokens"),  # 0 is valid: score the prompt only
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_invalid_params_raise_request_error_naming_the_field(fields, name):
    with pytest.raises(RequestError) as info:
        SamplingParams.make(**fields)
    assert info.value.field == name
    assert name in str(info.value)
    assert type(info.value) is RequestError  # the HTTP table's 400 (tests/http/test_error_table.py)


def test_valid_params_pass_through_make():
    params = SamplingParams.make(temperature=0.5, top_p=0.9, top_k=5, seed=3, logprobs=20, stop=["x"], max_tokens=3)
    assert (params.temperature, params.top_p, params.top_k, params.logprobs, params.max_tokens) == (0.5, 0.9, 5, 20, 3)


def tokens(engine, prompt, params, adapter=None) -> list[int]:
    (completion,) = engine.generate([prompt], params, [adapter])
    return completion.token_ids


SEEDED = SamplingParams(temperature=1.0, seed=123, max_tokens=8, ignore_eos=True)


def test_seed_gives_the_same_tokens_alone_or_in_a_batch():
    alone = tokens(make_engine(), PROMPTS[0], SEEDED)

    engine = make_engine()
    others = [
        engine.add_request(PROMPTS[1], SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)),
        engine.add_request(PROMPTS[2], greedy(5, frequency_penalty=1.0, logprobs=3)),
    ]
    engine.step()  # the seeded request joins a batch already decoding
    seq = engine.add_request(PROMPTS[0], SEEDED)
    others.append(engine.add_request(PROMPTS[3], SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=9)))
    while engine.has_unfinished():
        engine.step()
    assert seq.output_token_ids == alone
    assert all(len(other.output_token_ids) > 0 for other in others)


def test_different_seeds_give_different_tokens():
    engine = make_engine()
    first = tokens(engine, PROMPTS[0], SEEDED)
    again = tokens(engine, PROMPTS[0], SEEDED)
    other = tokens(engine, PROMPTS[0], SEEDED.model_copy(update={"seed": 124}))
    assert first == again
    assert other != first


def test_top_k_1_equals_greedy():
    engine = make_engine()
    expected = tokens(engine, PROMPTS[1], greedy(10))
    sampled = dict(max_tokens=10, ignore_eos=True)
    assert tokens(engine, PROMPTS[1], SamplingParams(temperature=1.5, top_k=1, **sampled)) == expected
    # a near-zero top_p keeps only the most likely token as well
    assert tokens(engine, PROMPTS[1], SamplingParams(temperature=1.0, top_p=1e-6, **sampled)) == expected


@pytest.mark.parametrize(
    "params",
    [
        greedy(5, logprobs=5),
        SamplingParams(temperature=1.5, seed=5, max_tokens=5, ignore_eos=True, logprobs=3),
    ],
    ids=["greedy", "sampled"],
)
def test_logprobs_are_the_models_raw_log_softmax(params):
    engine = make_engine()
    seq = engine.add_request(PROMPTS[0], params)
    streamed = []
    while engine.has_unfinished():
        for output in engine.step():
            assert len(output.logprobs) == len(output.token_ids) == 1
            streamed += output.logprobs
    assert len(seq.logprobs) == len(streamed) == params.max_tokens

    prompt_ids = encode(PROMPTS[0])
    reference = hf_logprobs(fresh_model(), prompt_ids + seq.output_token_ids)  # [T, V]
    for i, (token, logprob) in enumerate(zip(seq.output_token_ids, seq.logprobs)):
        row = reference[len(prompt_ids) - 1 + i]
        assert logprob.token_id == token
        assert logprob.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert len(logprob.top) == params.logprobs
        values = [value for _, value in logprob.top]
        assert values == sorted(values, reverse=True)
        top = torch.topk(row, params.logprobs)
        assert [token_id for token_id, _ in logprob.top] == top.indices.tolist()
        assert values == pytest.approx(top.values.tolist(), abs=1e-4)
        if params.is_greedy:
            assert logprob.top[0][0] == token


def test_logprobs_zero_gives_the_chosen_token_only():
    (completion,) = make_engine().generate([PROMPTS[0]], greedy(3, logprobs=0))
    assert [lp.token_id for lp in completion.logprobs] == completion.token_ids
    assert all(lp.top == [] for lp in completion.logprobs)


def max_repeats(ids: list[int]) -> int:
    return max(Counter(ids).values())


@pytest.mark.parametrize(
    "penalty",
    [dict(frequency_penalty=2.0), dict(presence_penalty=2.0), dict(repetition_penalty=1.5)],
    ids=lambda p: next(iter(p)),
)
def test_penalties_change_a_repeating_greedy_output(penalty):
    engine = make_engine()
    plain = tokens(engine, REPEATING, greedy(10))
    assert max_repeats(plain) >= 3, "precondition: the greedy output repeats a token"
    penalized = tokens(engine, REPEATING, greedy(10, **penalty))
    assert len(penalized) == 10
    assert penalized != plain
    assert max_repeats(penalized) < max_repeats(plain)


def test_stop_token_ids_stop_with_reason_stop():
    engine = make_engine()
    plain = tokens(engine, PROMPTS[2], greedy(8))
    k = first_new_token_index(plain)
    (completion,) = engine.generate([PROMPTS[2]], greedy(8, stop_token_ids=[plain[k]]))
    assert completion.token_ids == plain[: k + 1]
    assert completion.finish_reason == "stop"


def first_new_token_index(ids: list[int]) -> int:
    return next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])


def test_stop_string_in_generated_text_stops_without_leaking():
    engine = make_engine()
    (plain,) = engine.generate([PROMPTS[0]], greedy(12))
    middle = len(plain.text) // 2
    stop = plain.text[middle : middle + 6]
    assert "\ufffd" not in stop and len(stop) == 6
    expected = plain.text[: plain.text.find(stop)]

    seq = engine.add_request(PROMPTS[0], greedy(12, stop=[stop]))
    outputs = run_steps(engine)[seq.request_id]
    streamed = "".join(o.text for o in outputs)
    assert streamed == seq.detokenizer.text == expected
    assert outputs[-1].finish_reason == "stop"
    assert seq.output_token_ids == plain.token_ids[: len(seq.output_token_ids)]
    assert len(seq.output_token_ids) < 12


def test_eos_stops_unless_ignore_eos():
    plain = tokens(make_engine(), PROMPTS[3], greedy(8))
    k = first_new_token_index(plain)
    engine = make_engine(extra_eos=plain[k])
    assert engine.eos_token_ids == {2, plain[k]}
    (stopped,) = engine.generate([PROMPTS[3]], SamplingParams(temperature=0.0, max_tokens=8))
    assert (stopped.token_ids, stopped.finish_reason) == (plain[: k + 1], "stop")
    (ignored,) = engine.generate([PROMPTS[3]], greedy(8))
    assert (ignored.token_ids, ignored.finish_reason) == (plain, "length")


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_gives_length_and_exactly_that_many_tokens(max_tokens):
    engine = make_engine()
    seq = engine.add_request(PROMPTS[3], greedy(max_tokens))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert len(seq.output_token_ids) == max_tokens
    assert [o.finished for o in outputs] == [False] * (max_tokens - 1) + [True]
    assert outputs[-1].finish_reason == "length"
    assert outputs[-1].num_output_tokens == max_tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_seeded_and_penalized_sampling_on_cuda_matches_cpu():
    """A seeded row's noise is an integer hash of (seed, position, token) computed on the logits'
    device, and its token lists live on the host: sampling device logits must neither fail nor
    change which tokens a seed gives."""
    logits = 3 * torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))

    def make_seqs():
        params = [
            SamplingParams(temperature=1.0, seed=1, max_tokens=9, frequency_penalty=1.0, presence_penalty=0.5),
            SamplingParams(temperature=0.7, seed=2, max_tokens=9, top_k=20, top_p=0.9, repetition_penalty=1.3),
            greedy(9, logprobs=2),
        ]
        seqs = [Sequence(f"r{i}", [1, 2, 3], p, BASE_REF, None, p.max_tokens) for i, p in enumerate(params)]
        for seq in seqs:
            seq.output_token_ids = [4, 4, 5]
        return seqs

    cpu_tokens, _ = sample(logits, make_seqs())
    cuda_tokens, cuda_logprobs = sample(logits.cuda(), make_seqs())
    assert cuda_tokens == cpu_tokens
    assert len(cuda_logprobs[2].top) == 2


class HostReads(TorchFunctionMode):
    """Counts reads of tensor values by the host (each a device sync on CUDA)."""

    READS = frozenset({"tolist", "item", "__int__", "__float__", "__bool__", "__index__"})

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def sampling_step(num_greedy: int, num_sampled: int):
    params = [greedy(9)] * num_greedy + [
        SamplingParams(temperature=0.8, seed=i if i % 2 else None, top_k=30, top_p=0.9, max_tokens=9)
        for i in range(num_sampled)
    ]
    seqs = [Sequence(f"r{i}", [1, 2, 3], p, BASE_REF, None, p.max_tokens) for i, p in enumerate(params)]
    return 3 * torch.randn(len(seqs), 1000, generator=torch.Generator().manual_seed(0)), seqs


def test_a_step_reads_its_tokens_in_one_copy_not_one_per_row():
    """Eight greedy and four sampled rows: one host read for all twelve tokens (was one per row)."""
    logits, seqs = sampling_step(8, 4)
    with HostReads() as host:
        tokens, _ = sample(logits, seqs)
    assert host.reads == ["tolist"]
    assert tokens[:8] == logits[:8].argmax(-1).tolist()


def test_logprobs_cost_a_copy_per_step_not_per_row():
    logits, seqs = sampling_step(6, 0)
    seqs[1].params = greedy(9, logprobs=3)
    seqs[4].params = greedy(9, logprobs=0)
    with HostReads() as host:
        tokens, logprobs = sample(logits, seqs)
    assert len(host.reads) <= 4  # tokens, their logprobs, the top ids and values
    raw = torch.log_softmax(logits, -1)
    assert logprobs[1].logprob == raw[1, tokens[1]].item() and len(logprobs[1].top) == 3
    assert logprobs[4].top == [] and logprobs[0] is None


def test_seeded_noise_is_a_pure_function_of_seed_and_position_and_samples_the_distribution():
    first = seeded_uniform([123, -5], [0, 7], 1000, torch.device("cpu"))
    assert torch.equal(first, seeded_uniform([123, -5], [0, 7], 1000, torch.device("cpu")))
    assert not torch.equal(first[0], seeded_uniform([123], [1], 1000, torch.device("cpu"))[0])
    assert bool(((first > 0) & (first < 1)).all()) and abs(first.mean().item() - 0.5) < 0.02
    # The race over 4000 seeds picks each of four tokens at its probability.
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    noise = -torch.log(seeded_uniform(list(range(4000)), [0] * 4000, 4, torch.device("cpu"))).float()
    counts = torch.bincount((probs / noise).argmax(-1), minlength=4) / 4000
    torch.testing.assert_close(counts, probs, atol=0.025, rtol=0)
