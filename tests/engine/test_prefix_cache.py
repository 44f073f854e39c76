"""Prefix caching on the tiny engine: prompts' blocks computed once, outputs unchanged, and never
shared across adapter identities (other weights, a replaced version, another salt)."""

from __future__ import annotations

import hashlib
import random

import pytest

from adapters.identity import BASE_IDENTITY
from server.engine.adapter_ref import AdapterRef
from server.engine.prefix_cache import PrefixCache
from server.engine.sampling_params import SamplingParams
from server.http.api_models import CompletionRequest
from server.http.metrics import Metrics
from support.engine import assert_released, encode, greedy, make_engine, pristine_model, run_steps

SYSTEM = "You are a careful assistant. Answer briefly and cite the rule you used. " * 4  # ~70 tokens
QUESTIONS = [" Q: what is two plus two?", " Q: name a colour.", " Q: who wrote Hamlet?", " Q: spell cat."]
EXTRA = {  # besides support.engine's "a" (all-linear) and "b" (q, v, down)
    "kv": {"r": 8, "lora_alpha": 16, "target_modules": ["k_proj", "v_proj"]},
    # the last layer's MLP only: K/V equal the base's, so sharing would be harmless, and still must not happen
    "late_mlp": {"r": 8, "lora_alpha": 16, "target_modules": ["down_proj"], "layers_to_transform": [1]},
}


@pytest.fixture
def paths(adapter_paths, tmp_path_factory, make_peft_adapter):
    if not _extra:
        root = tmp_path_factory.mktemp("prefix-adapters")
        _extra.update({name: make_peft_adapter(pristine_model(), root / name, **kw) for name, kw in EXTRA.items()})
    return {**adapter_paths, **_extra}


_extra: dict = {}


def run(engine, prompts, adapters, params=None):
    """Requests one after another (each finishes before the next is added): a deterministic schedule."""
    params = params or greedy(6)
    return [engine.generate([p], params, [a])[0].token_ids for p, a in zip(prompts, adapters)]


def hits(engine) -> int:
    return engine.stats().prefix_cache_hits


# Identity
def test_identity_is_a_digest_of_content_computed_at_parse(paths):
    engine = make_engine()
    registry = engine.registry
    parsed = registry.parse("x", paths["a"])
    identity = parsed.identity
    assert len(identity) == 32 and identity != BASE_IDENTITY
    assert registry.install("x", parsed, paths["a"]) and registry.version("x").identity == identity
    assert registry.add("y", paths["a"]) and registry.version("y").identity == identity, "names are not in it"
    registry.add("x", paths["b"], replace=True)
    assert registry.version("x").identity not in (identity, BASE_IDENTITY), "a replacement gets a new identity"
    assert len({registry.version(n).identity for n in ("x", "y")}) == 2


def test_salt_cannot_spell_another_root():
    cache = make_engine().cache
    prefix = PrefixCache(cache)
    ids = list(range(32))
    other = hashlib.sha256(b"other").digest()
    names = {
        prefix.hash_blocks(i, s, ids)[0]
        for i in (BASE_IDENTITY, other)
        for s in (None, "", "x", other.hex(), BASE_IDENTITY.decode("latin-1"))
    }
    assert len(names) == 10


# Hits and equal outputs
@pytest.mark.parametrize("adapter", [None, "a", "b", "kv"])
def test_a_shared_prompt_is_computed_once_and_outputs_are_unchanged(paths, adapter):
    prompts, adapters = [SYSTEM + q for q in QUESTIONS], [adapter] * len(QUESTIONS)
    expected = run(make_engine(paths, enable_prefix_caching=False), prompts, adapters)
    engine = make_engine(paths)
    steps = []
    engine.step_listeners.append(steps.append)
    assert run(engine, prompts, adapters) == expected
    num_shared = len(encode(SYSTEM)) // 16 * 16
    assert hits(engine) >= 3 * num_shared
    prefills = [s.num_tokens for s in steps if s.num_tokens > 1]
    assert prefills[0] > num_shared and max(prefills[1:]) < prefills[0] - num_shared + 16
    assert_released(engine)


def test_a_running_requests_blocks_are_hit_while_it_decodes(paths):
    prompts = [SYSTEM + QUESTIONS[0], SYSTEM + QUESTIONS[1]]
    expected = run(make_engine(paths, enable_prefix_caching=False), prompts, ["a", "a"], greedy(12))
    engine = make_engine(paths)
    first = engine.add_request(prompts[0], greedy(12), AdapterRef.named("a"))
    engine.step()
    second = engine.add_request(prompts[1], greedy(12), AdapterRef.named("a"))
    run_steps(engine)
    assert second.prefix_cache_hits > 0
    assert [first.output_token_ids, second.output_token_ids] == expected


def test_chunked_prefill_and_a_mixed_batch_with_shared_prefixes(paths):
    prompts = [SYSTEM + q for q in QUESTIONS] * 2
    adapters = [None, "a", "b", "kv", "a", None, "kv", "b"]
    params = [greedy(5 + i) for i in range(len(prompts))]
    expected = [
        c.token_ids
        for c in make_engine(paths, enable_prefix_caching=False, max_num_batched_tokens=48).generate(
            prompts[:1], params[:1], adapters[:1]
        )
    ]
    engine = make_engine(paths, max_num_batched_tokens=48)
    assert [c.token_ids for c in engine.generate(prompts[:1], params[:1], adapters[:1])] == expected
    # the rest arrive together, each chunked, each hitting its own adapter's blocks (or computing them)
    alone = [
        make_engine(paths, enable_prefix_caching=False).generate([p], [sp], [a])[0].token_ids
        for p, sp, a in zip(prompts[1:], params[1:], adapters[1:])
    ]
    assert [c.token_ids for c in engine.generate(prompts[1:], params[1:], adapters[1:])] == alone
    assert hits(engine) > 0
    assert_released(engine)


def test_preemption_with_shared_prefixes_keeps_outputs(paths):
    prompts, adapters = [SYSTEM + q for q in QUESTIONS], [None, "a", "a", "kv"]
    params = [greedy(60 + 2 * i) for i in range(4)]
    expected = make_engine(paths, enable_prefix_caching=False).generate(prompts, params, adapters)
    engine = make_engine(paths, kv_cache_tokens=384)  # 24 pages; together they need ~36
    seqs = [engine.add_request(p, sp, AdapterRef.of(a)) for p, sp, a in zip(prompts, params, adapters)]
    run_steps(engine)
    assert engine.stats().num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == [c.token_ids for c in expected]
    assert_released(engine)
    assert engine.cache.num_cached_tokens <= engine.cache.capacity_tokens


# Never across identities
@pytest.mark.parametrize(
    "first, second", [("a", "b"), (None, "a"), ("a", None), ("kv", "a"), (None, "late_mlp"), ("late_mlp", None)]
)
def test_a_prefix_is_never_hit_under_another_adapter(paths, first, second):
    engine = make_engine(paths)
    run(engine, [SYSTEM + QUESTIONS[0]], [first])
    before = hits(engine)
    (tokens,) = run(engine, [SYSTEM + QUESTIONS[1]], [second])
    assert hits(engine) == before, f"{second} was served {first}'s blocks"
    assert tokens == run(make_engine(paths, enable_prefix_caching=False), [SYSTEM + QUESTIONS[1]], [second])[0]


def test_a_replaced_adapter_never_hits_its_old_versions_blocks(paths):
    engine = make_engine(paths)
    prompt = SYSTEM + QUESTIONS[0]
    (old,) = run(engine, [prompt], ["a"])
    run(engine, [prompt], ["a"])
    assert hits(engine) > 0, "the same version does hit"
    engine.registry.add("a", paths["kv"], replace=True)  # k/v weights: the cached K/V are now wrong
    before = hits(engine)
    (new,) = run(engine, [prompt], ["a"])
    assert hits(engine) == before
    assert new == run(make_engine(paths, enable_prefix_caching=False), [prompt], ["kv"])[0]
    assert new != old, "the two versions must differ, or the test proves nothing"


def test_cache_salt_partitions_the_cache(paths):
    engine = make_engine(paths)
    prompt = SYSTEM + QUESTIONS[0]

    def salted(salt: str):
        return greedy(4, cache_salt=salt)

    run(engine, [prompt], ["a"], salted("tenant-1"))
    for params in (salted("tenant-2"), greedy(4)):
        before = hits(engine)
        run(engine, [prompt], ["a"], params)
        assert hits(engine) == before
    run(engine, [prompt], ["a"], salted("tenant-1"))
    assert hits(engine) > before


def test_prompt_logprobs_requests_compute_every_prompt_row(paths):
    engine = make_engine(paths)
    prompt = SYSTEM + QUESTIONS[0]
    run(engine, [prompt], [None])
    (scored,) = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    assert len(scored.prompt_logprobs) == len(encode(prompt))
    assert engine.stats().prefix_cache_queries == len(encode(prompt)), "the scoring request did not look up"


# Memory
def test_cached_blocks_are_evicted_before_any_running_sequence_is_preempted(paths):
    engine = make_engine(paths, kv_cache_tokens=512)
    for i in range(6):  # distinct prompts: their blocks fill the pool once they finish
        run(engine, [f"{i} " + SYSTEM], [None])
    assert engine.cache.num_cached_tokens > 256
    seqs = [engine.add_request(q * 8, greedy(100)) for q in QUESTIONS[:2]]
    run_steps(engine)
    assert engine.stats().num_preemptions == 0 and engine.stats().num_prefix_cache_evictions > 0
    assert all(s.finish_reason == "length" for s in seqs)
    assert engine.cache.num_cached_tokens + engine.cache.num_reserved_tokens <= engine.cache.capacity_tokens


def test_no_leak_after_random_prefixes_and_aborts(paths):
    rng = random.Random(0)
    engine = make_engine(paths, kv_cache_tokens=1024, max_num_batched_tokens=64)
    heads = [SYSTEM, SYSTEM[:100], "Other text entirely. " * 5]
    for _ in range(6):
        seqs = [
            engine.add_request(
                rng.choice(heads) + rng.choice(QUESTIONS) * rng.randint(1, 3),
                greedy(rng.randint(1, 20)),
                AdapterRef.of(rng.choice([None, "a", "kv"])),
            )
            for _ in range(6)
        ]
        for _ in range(rng.randint(1, 8)):
            engine.step()
            cache = engine.cache
            assert cache.num_reserved_tokens + cache.num_cached_tokens <= cache.capacity_tokens
        for seq in rng.sample(seqs, 3):
            engine.abort(seq.request_id)  # a client that went away
        run_steps(engine)
    assert_released(engine)
    assert hits(engine) > 0
    assert engine.stats().kv_used_tokens == 0
    assert engine.prefix_cache.num_indexed_blocks == len(engine.cache.cached), "index and pool agree"


def test_caching_off_keeps_nothing(paths):
    engine = make_engine(paths, enable_prefix_caching=False)
    run(engine, [SYSTEM + QUESTIONS[0]] * 2, [None, None])
    stats = engine.stats()
    assert (stats.prefix_cache_hits, stats.prefix_cache_queries, stats.kv_cached_tokens) == (0, 0, 0)


def test_metrics_use_vllms_names_and_report_the_hit_rate_per_adapter(paths):
    engine, metrics = make_engine(paths), Metrics()
    metrics.attach(engine)
    run(engine, [SYSTEM + q for q in QUESTIONS[:2]], ["a", "a"])
    run(engine, [SYSTEM + QUESTIONS[2]], [None])
    engine.publish_stats()
    samples = {
        (s.name, s.labels.get("adapter")): s.value for family in metrics.registry.collect() for s in family.samples
    }
    queries, hits_ = samples[("vllm:prefix_cache_queries_total", None)], samples[("vllm:prefix_cache_hits_total", None)]
    assert queries == sum(len(encode(SYSTEM + q)) for q in QUESTIONS[:3]) and hits_ == hits(engine) > 0
    assert samples[("loraserve:adapter_prefix_cache_hits_total", "__base__")] == 0
    assert (
        samples[("loraserve:adapter_prefix_cache_hit_rate", "a")]
        == hits_ / samples[("loraserve:adapter_prefix_cache_queries_total", "a")]
    )
    assert samples[("loraserve:kv_cache_cached_tokens", None)] == engine.cache.num_cached_tokens > 0
    assert samples[("vllm:kv_cache_usage_perc", None)] == 0, "cached blocks are not usage"


def test_cache_salt_is_a_request_field():
    request = CompletionRequest(model="m", prompt="hi", cache_salt="tenant-1")
    assert request.sampling_params(4, None, 0).cache_salt == "tenant-1"


def test_a_composition_shares_only_with_the_same_members_and_scales(paths):
    engine, mix = make_engine(paths), (("a", 1.0), ("kv", 1.0))
    for adapter in ("a", (("a", 1.0),), (("a", 0.5),), mix):
        before = hits(engine)
        run(engine, [SYSTEM + QUESTIONS[0]], [adapter])
        assert hits(engine) == before, f"{adapter} was served another identity's blocks"
    (tokens,) = run(engine, [SYSTEM + QUESTIONS[1]], [mix])
    assert hits(engine) > before
    assert tokens == run(make_engine(paths, enable_prefix_caching=False), [SYSTEM + QUESTIONS[1]], [mix])[0]
