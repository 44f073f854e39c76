"""LLMEngine on a tiny random Llama: PEFT parity, continuous batching, chunked prefill, capacity
limits, preemption, abort, the merged/gather mode policy, adapter fairness and typed errors."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from adapters import AdapterNotFoundError
from server.engine.adapter_ref import AdapterRef
from server.engine.config import EngineConfig
from server.engine.errors import PromptTooLongError, QueueFullError, RequestError
from server.engine.sequence import SeqStatus
from support.engine import (
    PROMPTS,
    assert_released,
    encode,
    fresh_model,
    greedy,
    hf_greedy,
    make_engine,
    peft_reference,
    run_steps,
)

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 6


def record_steps(engine) -> list:
    steps = []
    engine.step_listeners.append(steps.append)
    return steps


def alone(prompt, max_tokens, adapter=None, paths=None) -> list[int]:
    """Greedy tokens of one request on an unconstrained engine of its own."""
    (completion,) = make_engine(paths).generate([prompt], greedy(max_tokens), [adapter])
    return completion.token_ids


# PEFT parity
def test_mixed_batch_equals_peft_generate_per_request(adapter_paths):
    requests = [
        (PROMPTS[0], None, 10),
        (PROMPTS[0], "a", 10),
        (PROMPTS[0], "b", 10),
        (PROMPTS[1], "a", 7),
        (PROMPTS[2], None, 12),
        (PROMPTS[3], "b", 9),
        (LONG_PROMPT, "a", 6),
    ]
    engine = make_engine(adapter_paths)
    steps = record_steps(engine)
    completions = engine.generate(
        [p for p, _, _ in requests], [greedy(n) for _, _, n in requests], [a for _, a, _ in requests]
    )
    assert steps[0].mode == "gather" and steps[0].num_distinct_adapters == 2

    reference = peft_reference(adapter_paths)
    for (prompt, adapter, n), completion in zip(requests, completions):
        assert completion.finish_reason == "length"
        assert completion.token_ids == hf_greedy(reference, encode(prompt), n, adapter), (prompt, adapter)
    same_prompt = [tuple(c.token_ids) for c in completions[:3]]
    assert len(set(same_prompt)) == 3, "each adapter must change the output, or the test proves nothing"
    assert_released(engine)


def test_packed_and_plain_base_weights_give_the_same_tokens(adapter_paths):
    """The engine packs base weights on CPU by default (the tests above run that path against
    HF/PEFT); kernel_choice="plain" keeps stock F.linear and must agree token for token."""
    prompts, adapters = [PROMPTS[0], PROMPTS[1], PROMPTS[2]], ["a", None, "b"]
    packed, plain = make_engine(adapter_paths), make_engine(adapter_paths, kernel_choice="plain")
    embedding = packed.lora_model.model.get_input_embeddings()  # a lookup: nothing to pack
    groups = packed.runner.lean.fused.values()  # q/k/v and gate/up run on one packed copy per group
    assert groups and all(group.kernel.packed is not None for group in groups)
    fused = {id(m) for group in groups for m in group.members}
    assert all(
        layer.packed_weight is not None
        for layer in packed.lora_model.layers.values()
        if layer is not embedding and id(layer) not in fused
    )
    assert all(layer.packed_weight is None for layer in plain.lora_model.layers.values())
    tokens = [[c.token_ids for c in engine.generate(prompts, greedy(8), adapters)] for engine in (packed, plain)]
    assert tokens[0] == tokens[1]


def test_runner_packs_each_adapters_rows_side_by_side(adapter_paths):
    """Requests arriving interleaved (a, b, base, a, b, base) reach the LoRA op as one run per adapter
    in every step, so no step pays for the grouped gather; the outputs still match the test above."""
    engine = make_engine(adapter_paths)
    batches, build = [], engine.lora_model.build_batch
    engine.lora_model.build_batch = lambda token_slots, **kw: batches.append(build(token_slots, **kw)) or batches[-1]
    adapters = ["a", "b", None] * 2
    completions = engine.generate([PROMPTS[i % 4] for i in range(6)], greedy(5), adapters)
    assert batches and all(b.groups is None and len(b.runs) == 2 for b in batches)
    assert all(len({r.slot for r in b.runs}) == 2 for b in batches)
    for adapter, prompt, completion in zip(adapters, PROMPTS * 2, completions):
        assert completion.token_ids == alone(prompt, 5, adapter, adapter_paths)


# Scheduling
def test_request_added_while_others_decode_starts_at_once():
    engine = make_engine()
    first = [engine.add_request(PROMPTS[0], greedy(12)), engine.add_request(PROMPTS[1], greedy(12))]
    for _ in range(3):
        engine.step()
    late = engine.add_request(PROMPTS[2], greedy(4))
    first_token_step, finish_step = {}, {}
    for step in range(4, 20):
        for output in engine.step():
            if output.token_ids:
                first_token_step.setdefault(output.request_id, step)
            if output.finished:
                finish_step[output.request_id] = step
        if not engine.has_unfinished():
            break
    assert first_token_step[late.request_id] == 4  # the very next step
    assert finish_step[late.request_id] == 7
    assert all(finish_step[seq.request_id] == 12 for seq in first)  # never paused for it
    assert late.output_token_ids == alone(PROMPTS[2], 4)
    assert [seq.output_token_ids for seq in first] == [alone(PROMPTS[0], 12), alone(PROMPTS[1], 12)]


def test_chunked_prefill_keeps_decodes_going():
    budget = 16
    engine = make_engine(max_num_batched_tokens=budget)
    steps = record_steps(engine)
    running = engine.add_request(PROMPTS[0], greedy(20))
    engine.step()
    long = engine.add_request(LONG_PROMPT, greedy(5))
    num_prompt = len(long.prompt_token_ids)
    expected_prefill_steps = math.ceil(num_prompt / (budget - 1))  # the decode takes one token per step
    assert expected_prefill_steps >= 3

    for step in range(1, expected_prefill_steps + 1):
        outputs = {o.request_id: o for o in engine.step()}
        assert len(outputs[running.request_id].token_ids) == 1  # one token every step
        assert (long.request_id in outputs) == (step == expected_prefill_steps)
        assert long.num_computed == min(num_prompt, step * (budget - 1))
    run_steps(engine)

    assert all(s.num_tokens <= budget for s in steps)
    assert long.output_token_ids == hf_greedy(fresh_model(), long.prompt_token_ids, 5)
    assert running.output_token_ids == hf_greedy(fresh_model(), running.prompt_token_ids, 20)
    assert_released(engine)


def test_chunked_prefill_of_a_lone_prompt():
    engine = make_engine(max_num_batched_tokens=8)
    seq = engine.add_request(LONG_PROMPT, greedy(3))
    num_silent = math.ceil(len(seq.prompt_token_ids) / 8) - 1
    assert [engine.step() for _ in range(num_silent)] == [[]] * num_silent  # chunks that sample nothing
    assert seq.num_computed == num_silent * 8
    run_steps(engine)
    assert seq.output_token_ids == hf_greedy(fresh_model(), seq.prompt_token_ids, 3)


def test_max_num_seqs_bounds_running_sequences():
    engine = make_engine(max_num_seqs=2)
    steps = record_steps(engine)
    seqs = [engine.add_request(PROMPTS[i % 4], greedy(3 + i)) for i in range(5)]
    max_running, saw_waiting = 0, False
    while engine.has_unfinished():
        engine.step()
        stats = engine.stats()
        max_running = max(max_running, stats.num_running)
        saw_waiting |= stats.num_waiting > 0
        assert len(engine.scheduler.running) == stats.num_running <= 2
    assert max_running == 2 and saw_waiting
    assert max(s.num_seqs for s in steps) == 2
    assert [s.output_token_ids for s in seqs] == [alone(PROMPTS[i % 4], 3 + i) for i in range(5)]
    assert_released(engine)


def test_preemption_under_a_small_kv_budget_keeps_outputs(adapter_paths):
    prompts, adapters = PROMPTS, [None, "a", "b", "a"]
    params = [greedy(84 + 2 * i) for i in range(4)]  # ~6 pages each; a new extent takes at most 5
    expected = make_engine(adapter_paths).generate(prompts, params, adapters)

    engine = make_engine(adapter_paths, kv_cache_tokens=256)  # 16 pages; the 4 requests need ~24
    finished = []
    engine.request_listeners.append(finished.append)
    seqs = [engine.add_request(p, sp, AdapterRef.of(a)) for p, sp, a in zip(prompts, params, adapters)]
    while engine.has_unfinished():
        engine.step()
        # a preempted request gives its adapter back while it waits
        assert all(not seq.leases for seq in engine.scheduler.waiting)
        held = Counter(seq.label for seq in engine.scheduler.running if seq.label)
        assert engine.registry.held() == held

    assert engine.stats().num_preemptions > 0
    assert sum(r.num_preemptions for r in finished) == engine.stats().num_preemptions
    assert [s.output_token_ids for s in seqs] == [c.token_ids for c in expected]
    assert [s.detokenizer.text for s in seqs] == [c.text for c in expected]
    assert_released(engine)


def test_abort_frees_kv_and_adapter_at_once(adapter_paths):
    engine = make_engine(adapter_paths)
    victim = engine.add_request(PROMPTS[0], greedy(30), AdapterRef.named("a"))
    other = engine.add_request(PROMPTS[1], greedy(10), AdapterRef.named("b"))
    for _ in range(3):
        engine.step()
    reserved = engine.stats().kv_reserved_tokens
    victim_tokens = engine.cache.extents[victim.seq_id].num_pages * 16

    output = engine.abort(victim.request_id)
    assert output.finished and output.finish_reason == "abort"
    assert output.num_output_tokens == 3
    assert victim.seq_id not in engine.cache.extents
    assert engine.stats().kv_reserved_tokens == reserved - victim_tokens
    assert "a" not in engine.registry.held()
    assert engine.abort(victim.request_id) is None  # already gone

    outputs = run_steps(engine)
    assert victim.request_id not in outputs
    assert outputs[other.request_id][-1].finish_reason == "length"
    assert len(victim.output_token_ids) == 3
    assert_released(engine)


def test_abort_a_waiting_request():
    engine = make_engine()
    seq = engine.add_request(PROMPTS[0], greedy(5))
    output = engine.abort(seq.request_id)
    assert (output.finish_reason, output.num_output_tokens) == ("abort", 0)
    assert not engine.scheduler.waiting and engine.step() == []
    assert_released(engine)


def test_adapter_removed_while_waiting_still_serves_the_request_it_accepted(adapter_paths):
    expected = alone(PROMPTS[0], 5, "a", adapter_paths)
    engine = make_engine(adapter_paths)
    seq = engine.add_request(PROMPTS[0], greedy(5), AdapterRef.named("a"))
    engine.registry.remove("a")
    assert "a" not in engine.registry
    with pytest.raises(AdapterNotFoundError):  # new requests no longer find it
        engine.add_request(PROMPTS[0], greedy(5), AdapterRef.named("a"))
    run_steps(engine)
    assert (seq.finish_reason, seq.output_token_ids) == ("length", expected)
    assert seq.bound[0][0].num_requests == 0 and seq.bound[0][0].adapter is None, (
        "the old version is freed after its last user"
    )
    assert engine.registry.resident() == [None] * engine.registry.max_loras
    assert_released(engine)


def test_replace_during_preemption_keeps_each_request_on_its_admitted_version(adapter_paths):
    """A request preempted (KV dropped) and recomputed after `replace` must not mix two adapters."""
    prompts, params = PROMPTS, [greedy(84 + 2 * i) for i in range(4)]  # as in the preemption test above
    old = make_engine(adapter_paths).generate(prompts, params, ["a"] * 4)
    engine = make_engine(adapter_paths, kv_cache_tokens=256)
    seqs = [engine.add_request(p, sp, AdapterRef.named("a")) for p, sp in zip(prompts, params)]
    while not engine.stats().num_preemptions:
        engine.step()
    engine.registry.add("a", adapter_paths["b"], replace=True)
    # admitted after the replace: the new weights
    late = engine.add_request(PROMPTS[0], greedy(6), AdapterRef.named("a"))
    run_steps(engine)
    assert [s.output_token_ids for s in seqs] == [c.token_ids for c in old]
    assert late.output_token_ids == alone(PROMPTS[0], 6, "b", adapter_paths)
    assert late.output_token_ids != alone(PROMPTS[0], 6, "a", adapter_paths), "the two versions must differ"
    assert_released(engine)


# Merged/gather mode policy
def test_single_adapter_merges_after_the_streak(adapter_paths):
    engine = make_engine(adapter_paths, merge_after_steps=3)
    steps = record_steps(engine)
    (merged,) = engine.generate([PROMPTS[0]], greedy(8), ["a"])

    assert [s.mode for s in steps] == ["gather"] * 2 + ["merged"] * 6
    assert [s.swap_seconds is not None for s in steps] == [False, False, True] + [False] * 5
    stats = engine.stats()
    assert stats.num_swaps == 1
    assert dict(stats.steps_by_mode) == {"gather": 2, "merged": 6}
    assert all(s.num_distinct_adapters == 1 for s in steps)

    gather_only = make_engine(adapter_paths, merge_after_steps=1000)
    (gathered,) = gather_only.generate([PROMPTS[0]], greedy(8), ["a"])
    assert gather_only.stats().steps_by_mode == {"gather": 8}
    assert merged.token_ids == gathered.token_ids
    assert merged.token_ids == hf_greedy(peft_reference(adapter_paths), encode(PROMPTS[0]), 8, "a")


def test_rows_about_to_end_are_served_gathered_not_merged(adapter_paths):
    """A merge costs many gathered steps: only rows with at least `merge_min_steps_left` still to
    run are merged (here 3: the third step of five has three left, of four only two)."""
    engine = make_engine(adapter_paths, merge_after_steps=3, merge_min_steps_left=3)
    steps = record_steps(engine)
    (short,) = engine.generate([PROMPTS[0]], greedy(4), ["a"])
    assert [s.mode for s in steps] == ["gather"] * 4 and engine.stats().num_swaps == 0
    engine = make_engine(adapter_paths, merge_after_steps=3, merge_min_steps_left=3)
    steps = record_steps(engine)
    (longer,) = engine.generate([PROMPTS[0]], greedy(5), ["a"])
    assert [s.mode for s in steps] == ["gather"] * 2 + ["merged"] * 3 and engine.stats().num_swaps == 1
    assert (
        longer.token_ids[:4] == short.token_ids == hf_greedy(peft_reference(adapter_paths), encode(PROMPTS[0]), 4, "a")
    )


def test_by_default_a_request_merges_only_with_steps_enough_to_repay_it(adapter_paths):
    """The server's default: a short request on an adapter asked for again stays gathered (its merge
    would cost more than it saves); a long one on it merges at once (the streak runs across requests)."""
    engine = make_engine(adapter_paths, merge_min_steps_left=EngineConfig().merge_min_steps_left)
    steps = record_steps(engine)
    for _ in range(3):
        engine.generate([PROMPTS[0]], greedy(8), ["a"])
    assert {s.mode for s in steps} == {"gather"} and engine.stats().num_swaps == 0
    steps.clear()
    engine.generate([PROMPTS[0]], greedy(40), ["a"])
    assert [s.mode for s in steps] == ["merged"] * 40 and engine.stats().num_swaps == 1


def test_base_and_mixed_steps_never_merge(adapter_paths):
    engine = make_engine(adapter_paths, merge_after_steps=1)
    steps = record_steps(engine)
    engine.generate([PROMPTS[0], PROMPTS[1]], greedy(4), [None, None])
    assert {(s.mode, s.num_distinct_adapters) for s in steps} == {("base", 0)}
    steps.clear()
    engine.generate([PROMPTS[0], PROMPTS[1]], greedy(4), ["a", "b"])
    assert {(s.mode, s.num_distinct_adapters) for s in steps} == {("gather", 2)}
    steps.clear()
    engine.generate([PROMPTS[0], PROMPTS[1]], greedy(4), [None, "b"])
    assert {(s.mode, s.num_distinct_adapters) for s in steps} == {("gather", 1)}
    assert engine.stats().num_swaps == 0


def test_merged_then_mixed_then_merged_again_matches_peft(adapter_paths):
    engine = make_engine(adapter_paths, merge_after_steps=2)
    steps = record_steps(engine)
    long = engine.add_request(PROMPTS[0], greedy(14), AdapterRef.named("a"))
    for _ in range(4):
        engine.step()
    short = engine.add_request(PROMPTS[1], greedy(3), AdapterRef.named("b"))  # a mixed stretch while "a" is merged
    base = engine.add_request(PROMPTS[2], greedy(2))
    run_steps(engine)

    modes = [s.mode for s in steps]
    assert (
        modes
        == ["gather", "merged", "merged", "merged", "gather", "gather", "gather", "gather", "merged"] + ["merged"] * 5
    )
    assert engine.stats().num_swaps == 2
    reference = peft_reference(adapter_paths)
    assert long.output_token_ids == hf_greedy(reference, encode(PROMPTS[0]), 14, "a")
    assert short.output_token_ids == hf_greedy(reference, encode(PROMPTS[1]), 3, "b")
    assert base.output_token_ids == hf_greedy(reference, encode(PROMPTS[2]), 2)
    assert_released(engine)


# Fairness
def rare_admission_step(adapter_paths, max_bypass_steps: int, max_steps: int) -> int | None:
    """Feed one "popular" request per step with one adapter slot; the step "rare" is admitted at."""
    engine = make_engine(max_loras=1, max_bypass_steps=max_bypass_steps)
    engine.registry.add("popular", adapter_paths["a"])
    engine.registry.add("rare", adapter_paths["b"])
    rare = None
    for step in range(max_steps):
        engine.add_request(PROMPTS[step % 4], greedy(3), AdapterRef.named("popular"))
        if step == 1:
            rare = engine.add_request(PROMPTS[1], greedy(3), AdapterRef.named("rare"))
        engine.step()
        if rare is not None and rare.status is not SeqStatus.WAITING:
            return step
    return None


def test_rare_adapter_is_not_starved(adapter_paths):
    max_bypass_steps, max_tokens = 4, 3
    admitted = rare_admission_step(adapter_paths, max_bypass_steps, max_steps=40)
    assert admitted is not None
    assert admitted - 1 <= max_bypass_steps + max_tokens + 3
    # Without the bound the stream of popular requests keeps the only slot busy forever.
    assert rare_admission_step(adapter_paths, max_bypass_steps=1000, max_steps=30) is None


# Typed errors
def test_unknown_adapter_is_refused():
    engine = make_engine()
    with pytest.raises(AdapterNotFoundError):
        engine.add_request(PROMPTS[0], greedy(), AdapterRef.named("missing"))
    assert not engine.has_unfinished()


def test_generate_is_all_or_nothing(adapter_paths):
    engine = make_engine(adapter_paths)
    with pytest.raises(AdapterNotFoundError):
        engine.generate([PROMPTS[0], PROMPTS[1]], greedy(), ["a", "missing"])
    assert not engine.has_unfinished() and not engine.requests
    assert_released(engine)


def test_prompt_plus_max_tokens_over_max_model_len_is_refused():
    engine = make_engine(max_model_len=32)
    prompt = encode(LONG_PROMPT)[:27]
    engine.add_request(prompt, greedy(5))  # exactly 32 fits
    with pytest.raises(PromptTooLongError) as info:
        engine.add_request(prompt, greedy(6))
    assert info.value.field == "prompt"
    # the KV pool caps the context as well
    small = make_engine(kv_cache_tokens=32)
    assert small.max_model_len == 32
    with pytest.raises(PromptTooLongError):
        small.add_request(prompt, greedy(6))


def test_queue_full_is_refused():
    engine = make_engine(max_waiting=2)
    engine.add_request(PROMPTS[0], greedy())
    engine.add_request(PROMPTS[1], greedy())
    with pytest.raises(QueueFullError):
        engine.add_request(PROMPTS[2], greedy())
    engine.step()  # both admitted: the queue has room again
    engine.add_request(PROMPTS[2], greedy())


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt_is_refused(prompt):
    with pytest.raises(RequestError) as info:
        make_engine().add_request(prompt, greedy())
    assert info.value.field == "prompt"


def test_duplicate_request_id_is_refused():
    engine = make_engine()
    engine.add_request(PROMPTS[0], greedy(), request_id="x")
    with pytest.raises(RequestError) as info:
        engine.add_request(PROMPTS[1], greedy(), request_id="x")
    assert info.value.field == "request_id"
