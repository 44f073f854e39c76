"""Every served family (server/engine/model_families.py) equal to PEFT, and what is not served refused.

Each family's tiny random model (tests/support/families.py) gets two adapters with non-zero B on
every linear layer (attention only for MoE families: their experts and routers, PEFT's
target_parameters, are tested in test_moe_experts.py). Requests run alone (a single adapter merges
after a few steps) and then in one mixed batch with chunked prefill; each answer is checked against
PEFT teacher-forced on the engine's own tokens: every token is PEFT's greedy choice and every logprob
within TOL of PEFT's.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    chunked_causal_mask_function,
    sliding_window_causal_mask_function,
)

from server.engine import compiled_step, row_attention
from server.engine.attention_probe import UnsupportedModelError, mask_window, probe_attention
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_families import FAMILIES as SERVED
from server.engine.model_families import check_architecture
from server.engine.model_loader import BaseModel, load_base_model
from support.engine import MERGE_SOON, greedy, load_tokenizer
from support.families import ATTENTION, FAMILIES, MAX_POSITIONS, MOE, VOCAB, adapter_kwargs, model, pristine

# fp32 |Δ logprob|: the bound. Measured at most 5e-6 over every family here: the engine's
# packed oneDNN kernels against PEFT's MKL ones, summed in another order.
TOL = 1e-4
BASE = "__base__"  # PEFT's adapter name for a plain base row
BATCHED_TOKENS = 32  # the 40-token prompt is prefilled in two chunks
NEW_TOKENS = 6


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (5, 40, 9)]


PROMPTS = _prompts()
# (prompt, adapter): each adapter and the base on different prompts, twice over
REQUESTS = [(PROMPTS[i % 3], adapter) for i, adapter in enumerate([None, "a", "b", "a", "b", None])]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, make_peft_adapter):
    """family -> {name: directory} of its two PEFT adapters, written once per module."""
    root = tmp_path_factory.mktemp("family-adapters")

    @functools.cache
    def write(family: str) -> dict[str, Path]:
        return {
            name: make_peft_adapter(pristine(family), root / family / name, **kwargs)
            for name, kwargs in adapter_kwargs(family).items()
        }

    return write


def make_family_engine(family: str, paths: dict[str, Path] | None = None, **config) -> LLMEngine:
    config = {"max_num_batched_tokens": BATCHED_TOKENS, **config}
    base = BaseModel(model(family, **config.pop("model", {})), load_tokenizer(), family, Path(family))
    engine = LLMEngine(base, EngineConfig(**MERGE_SOON | config))
    for name, path in (paths or {}).items():
        engine.registry.add(name, path)
    return engine


def peft_reference(family: str, paths: dict[str, Path]) -> PeftModel:
    (first, first_path), *rest = paths.items()
    reference = PeftModel.from_pretrained(model(family), str(first_path), adapter_name=first)
    for name, path in rest:
        reference.load_adapter(str(path), adapter_name=name)
    return reference.eval()


@torch.no_grad()
def assert_equals_peft(reference: PeftModel, requests, completions) -> list[torch.Tensor]:
    """Each completion's tokens are PEFT's greedy choices and its logprobs PEFT's, within TOL;
    returns PEFT's log-probabilities of each request's sampled rows."""
    rows = []
    for (prompt, adapter), completion in zip(requests, completions):
        tokens = torch.tensor(completion.token_ids)
        assert completion.finish_reason == "length"
        ids = torch.tensor([prompt + completion.token_ids])
        logits = reference(input_ids=ids, adapter_names=[adapter or BASE]).logits[0].float()
        expected = torch.log_softmax(logits, -1)[len(prompt) - 1 : -1]  # [new tokens, V]
        chosen = expected[torch.arange(len(tokens)), tokens]
        assert (expected.max(-1).values - chosen).max() <= TOL, f"{adapter}: not PEFT's greedy tokens"
        ours = torch.tensor([entry.logprob for entry in completion.logprobs])
        assert (ours - chosen).abs().max() <= TOL, f"{adapter}: Δ logprob {(ours - chosen).abs().max():.2e}"
        rows.append(expected)
    return rows


# Every family equal to PEFT
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_equals_peft_alone_and_in_one_mixed_batch(family, adapters):
    paths = adapters(family)
    engine = make_family_engine(family, paths)
    params = greedy(NEW_TOKENS, logprobs=0)
    alone = [engine.generate([prompt], params, [adapter])[0] for prompt, adapter in REQUESTS[:3]]
    assert engine.stats().steps_by_mode.get("merged"), "an adapter alone never merged"
    steps = []
    engine.step_listeners.append(steps.append)
    mixed = engine.generate([prompt for prompt, _ in REQUESTS], params, [adapter for _, adapter in REQUESTS])
    assert steps[0].mode == "gather" and steps[0].num_distinct_adapters == 2

    reference = peft_reference(family, paths)
    assert_equals_peft(reference, REQUESTS[:3], alone)
    base, with_a, with_b = assert_equals_peft(reference, REQUESTS, mixed)[:3]
    for other in (with_a, with_b):  # the first row of each: its prompt differs, but not by chance alone
        assert (other[0] - base[0]).abs().max() > 1e-2, "an adapter must change the answer, or this proves nothing"


@pytest.mark.parametrize("family", ["gemma2", "falcon_old"])  # a softcap; one KV head for every query head
def test_row_kernels_serve_families_on_the_stock_forward_equal_to_peft(family, adapters):
    """The CUDA step path (here in Triton's interpreter): the row kernels under a family's own
    attention module, Gemma 2's softcap included."""
    paths = adapters(family)
    engine = make_family_engine(family, paths, step_kernels="triton")
    assert engine.runner.lean is None and engine.runner.row_kernels
    requests = REQUESTS[:3]  # 3 new tokens: the interpreter runs a few steps per second
    mixed = engine.generate([p for p, _ in requests], greedy(3, logprobs=0), [a for _, a in requests])
    assert_equals_peft(peft_reference(family, paths), requests, mixed)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])  # q/k/v biases; the lean pass's other families
def test_the_cuda_pass_serves_the_llama_families_equal_to_peft(family, adapters):
    """The CUDA pass (cuda_forward.py: fused q/k/v and gate/up, grouped LoRA, the layer kernels) on
    the families it serves besides Llama, in Triton's interpreter."""
    from server.engine.cuda_forward import CudaForward

    paths = adapters(family)
    engine = make_family_engine(family, paths, step_kernels="triton")
    assert isinstance(engine.runner.lean, CudaForward)
    requests = REQUESTS[:3]
    mixed = engine.generate([p for p, _ in requests], greedy(3, logprobs=0), [a for _, a in requests])
    assert_equals_peft(peft_reference(family, paths), requests, mixed)


@torch.no_grad()
def test_gemma2_softcaps_change_the_answer_and_are_served():
    """The family test above runs Gemma 2 with caps of 5 on attention scores and on logits; here,
    that those caps matter: without them HF's logits move by far more than the tolerance."""
    ids = torch.tensor([PROMPTS[1]])
    capped = model("gemma2")(ids).logits
    uncapped = model("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)(ids).logits
    assert (capped - uncapped).abs().max() > 100 * TOL
    assert probe_attention(model("gemma2")).num_layers == 2  # served, not refused


# Sliding windows: honoured past the window on every path, equal to HF's own forward
WINDOW = 4
WINDOWED = {  # family -> (its window fields, the window of each layer the probe reads)
    "mistral": (dict(sliding_window=WINDOW), [WINDOW, WINDOW]),
    "mixtral": (dict(sliding_window=WINDOW), [WINDOW, WINDOW]),
    "qwen2": (dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), [None, WINDOW]),
    "qwen3": (dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), [None, WINDOW]),
    "qwen3_moe": (dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), [WINDOW] * 2),  # its rule
    "gemma2": (dict(sliding_window=WINDOW), [WINDOW, None]),  # alternating, with its softcaps
    "gemma3": (dict(sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"]), [WINDOW, None]),
    "phi3": (dict(sliding_window=WINDOW), [WINDOW, WINDOW]),
    "starcoder2": (dict(sliding_window=WINDOW), [WINDOW, WINDOW]),
}
SHARED = PROMPTS[1][:20]  # 20 tokens: prefilled in chunks of 8, then its first block of 16 is hit
HIT = PROMPTS[1][:16] + PROMPTS[2][:5]


@torch.no_grad()
def assert_equals_hf(family: str, prompts: list[list[int]], completions) -> None:
    """Every token is the greedy choice of HF's own forward with the family's window (its mask, in
    transformers' attention), and every logprob within TOL of it; and the window changes HF's answer."""
    windowed, unwindowed = model(family, **WINDOWED[family][0]), model(family)
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion.token_ids])
        assert len(prompt) + len(completion.token_ids) > 3 * WINDOW
        expected = torch.log_softmax(windowed(ids).logits[0].float(), -1)[len(prompt) - 1 : -1]  # [new, V]
        tokens = torch.tensor(completion.token_ids)
        chosen = expected[torch.arange(len(tokens)), tokens]
        assert (expected.max(-1).values - chosen).max() <= TOL, "not HF's greedy tokens"
        ours = torch.tensor([entry.logprob for entry in completion.logprobs])
        assert (ours - chosen).abs().max() <= TOL, f"Δ logprob {(ours - chosen).abs().max():.2e}"
        full = torch.log_softmax(unwindowed(ids).logits[0].float(), -1)[len(prompt) - 1 : -1]
        assert (full - expected).abs().max() > 1e-2, "the window must change HF's answer, or this proves nothing"


@pytest.mark.parametrize("family", list(WINDOWED))
def test_sliding_windows_equal_hf_past_the_window_with_chunks_and_a_prefix_hit(family):
    """Per-layer windows of 4 keys, prompts of 5 to 21 tokens and 10 new: chunked prefill (8 tokens a
    step), then a request whose first block is a prefix-cache hit, decoding beside another one."""
    fields, windows = WINDOWED[family]
    engine = make_family_engine(family, model=fields, max_num_batched_tokens=8)
    assert engine.cache.windows == tuple(windows)
    assert engine.max_model_len == MAX_POSITIONS  # no longer capped at the window
    params = greedy(10, logprobs=0)
    first = engine.generate([SHARED], params)
    later = engine.generate([HIT, PROMPTS[0]], params)
    assert engine.stats().prefix_cache_hits >= 16
    assert_equals_hf(family, [SHARED, HIT, PROMPTS[0]], first + later)


@pytest.mark.parametrize(("family", "layers_per_graph"), [("mistral", 2), ("qwen2", 1)])
def test_sliding_windows_equal_hf_in_the_compiled_decode_step(family, layers_per_graph, tmp_path, monkeypatch):
    """One stream at a time decodes through the compiled CPU step (compiled_step.py), whose attention
    reads each layer's window of the pool: 10 new tokens past a window of 4, as HF's forward. Mistral
    windows every layer, both in one graph; Qwen2 one of two (and has q/k/v biases), one graph called
    for each layer, the windowed one's views and the full one's."""
    monkeypatch.setattr(compiled_step, "MAX_LAYERS_PER_GRAPH", layers_per_graph)
    engine = make_family_engine(family, model=WINDOWED[family][0], compile_decode="on", cache_dir=tmp_path)
    compiled = engine.runner.compiled
    assert compiled is not None and compiled.group == layers_per_graph
    before = compiled.num_steps
    completions = [engine.generate([prompt], greedy(10, logprobs=0))[0] for prompt in (SHARED, PROMPTS[0])]
    assert compiled.num_steps - before == 18, "every decode step of the two streams runs compiled"
    assert_equals_hf(family, [SHARED, PROMPTS[0]], completions)


def test_compiled_layers_keep_their_own_windows_past_the_warm_up(tmp_path, monkeypatch):
    """Qwen2 with a window of 80 keys on one layer of two, up to two layers a graph: the warm-up's
    context (64 keys) fits in the window, so there every layer's view is as long as the others';
    past 80 keys the windowed layer's views are shorter. Tokens and logprobs equal the eager pass's
    (tested against HF above), and the window changes them."""
    monkeypatch.setattr(compiled_step, "MAX_LAYERS_PER_GRAPH", 2)
    fields = dict(use_sliding_window=True, sliding_window=80, max_window_layers=1)
    compiled = make_family_engine("qwen2", model=fields, compile_decode="on", cache_dir=tmp_path)
    eager, unwindowed = make_family_engine("qwen2", model=fields), make_family_engine("qwen2")
    prompt, params = (PROMPTS[1] * 8)[:76], greedy(24, logprobs=0)
    warm_up = compiled.runner.compiled.num_steps
    ours, theirs, full = (engine.generate([prompt], params)[0] for engine in (compiled, eager, unwindowed))
    assert compiled.runner.compiled.num_steps - warm_up == 23  # every decode step
    assert ours.token_ids == theirs.token_ids
    logprobs = [[entry.logprob for entry in c.logprobs] for c in (ours, theirs, full)]
    assert max(abs(a - b) for a, b in zip(logprobs[0], logprobs[1])) <= 1e-4
    assert max(abs(a - b) for a, b in zip(logprobs[1], logprobs[2])) > 1e-2, "the window must matter here"


@pytest.mark.parametrize("family", ["mistral", "gemma3"])  # the lean pass; the stock forward, per layer
def test_sliding_windows_equal_hf_after_preemption_and_recompute(family):
    """A 16-page pool for four requests of one page that grow to six (a new extent takes five):
    some are preempted, and recompute their prompt and outputs as one prefill past the window."""
    engine = make_family_engine(family, model=WINDOWED[family][0], kv_cache_tokens=256)
    prompts = [PROMPTS[1][:12], PROMPTS[0], PROMPTS[2], PROMPTS[1][20:30]]
    completions = engine.generate(prompts, greedy(84, logprobs=0))
    assert engine.stats().num_preemptions > 0
    assert_equals_hf(family, prompts, completions)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])  # the lean pass; the stock forward, per layer
def test_sliding_windows_equal_hf_on_the_row_kernels(family):
    """The CUDA step path (Triton's interpreter here): the window is the kernels' lower key bound, on
    prefill chunks (8 tokens a step, the tiled kernel), decode rows, and after a prefix-cache hit."""
    engine = make_family_engine(family, model=WINDOWED[family][0], step_kernels="triton", max_num_batched_tokens=8)
    assert engine.runner.row_kernels and (engine.runner.lean is None) == (family == "gemma3")
    params = greedy(8, logprobs=0)
    first = engine.generate([SHARED], params)
    later = engine.generate([HIT, PROMPTS[0]], params)
    assert engine.stats().prefix_cache_hits >= 16
    assert_equals_hf(family, [SHARED, HIT, PROMPTS[0]], first + later)


def test_long_decode_rows_split_over_their_keys_on_the_row_kernels_equal_hf(monkeypatch):
    """Decode past 70 keys with splits of at least 16 (SPLIT_KEYS lowered from 256, so the interpreter
    runs short contexts): the full layer's rows split over programs, the windowed one's do not."""
    splits = []

    def recording(*args):
        splits.append(args[-1])
        return row_kernel(*args)

    row_kernel = row_attention.row_attention
    monkeypatch.setattr(row_attention, "SPLIT_KEYS", 16)
    monkeypatch.setattr(row_attention, "row_attention", recording)
    engine = make_family_engine("gemma3", model=WINDOWED["gemma3"][0], step_kernels="triton")
    prompt = (PROMPTS[1] + PROMPTS[2] + PROMPTS[0])[:48] + PROMPTS[1][:22]  # 70 tokens, prefilled tiled
    completions = engine.generate([prompt], greedy(4, logprobs=0))
    assert sorted(set(splits)) == [1, 4]  # the windowed layer's 4 keys; the full layer's 70-73 in 4 shares
    assert_equals_hf("gemma3", [prompt], completions)


@pytest.mark.parametrize("family", list(WINDOWED))
def test_the_probe_reads_each_layers_window(family):
    fields, windows = WINDOWED[family]
    assert [layer.window for layer in probe_attention(model(family, **fields)).layers] == windows


# What is not served is refused by name
def test_an_unserved_architecture_is_refused_before_its_weights_are_read(tmp_path):
    AutoConfig.for_model(
        "bloom", n_layer=2, n_head=4, hidden_size=64, architectures=["BloomForCausalLM"]
    ).save_pretrained(tmp_path)  # a config and no weights: the refusal must come first
    with pytest.raises(UnsupportedModelError, match="BloomForCausalLM.*'bloom'.*not a model family loraserve serves"):
        load_base_model(tmp_path)


def test_alibi_is_refused_by_name():
    config = AutoConfig.for_model("falcon", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, alibi=True)
    with pytest.raises(UnsupportedModelError, match="ALiBi"):
        check_architecture(config)


@pytest.mark.parametrize(
    ("model_type", "fields", "named"),
    [
        ("gpt_oss", dict(num_local_experts=4, head_dim=16), "attention sinks"),
        ("bloom", dict(n_layer=2, n_head=4), "does not run through transformers' AttentionInterface"),
        ("jamba", dict(num_experts=2, attn_layer_period=2, attn_layer_offset=1), "layers without attention"),
    ],
)
def test_attention_the_engine_does_not_implement_is_refused_by_name(model_type, fields, named):
    """Found by the probe from the model itself, so a family added to the table cannot bring one
    in silently (these are not in the table: the architecture check alone would refuse them)."""
    config = AutoConfig.for_model(model_type, **{**dict(vocab_size=VOCAB, hidden_size=64), **fields})
    config.update(dict(num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128))
    with pytest.raises(UnsupportedModelError, match=named):
        probe_attention(AutoModelForCausalLM.from_config(config).eval())


def test_mask_rules_are_read_and_new_kinds_refused():
    assert mask_window(causal_mask_function, 1 << 20) is None
    assert mask_window(sliding_window_causal_mask_function(4096), 1 << 20) == 4096
    assert mask_window(sliding_window_causal_mask_function(8), 6) is None  # never reached: plain causal
    for rule in (chunked_causal_mask_function(8, torch.zeros(1, dtype=torch.long)), bidirectional_mask_function):
        with pytest.raises(UnsupportedModelError, match="neither causal nor a causal sliding window"):
            mask_window(rule, 1 << 20)


def test_every_family_tested_here_is_in_the_served_table():
    tested = {AutoConfig.for_model(model_type).model_type for model_type, _ in FAMILIES.values()}
    assert tested == set(SERVED), "a served family without a test, or a test of an unserved one"
    assert set(MOE) <= set(FAMILIES) and ATTENTION
