"""Every served family (server/engine/model_families.py) equal to PEFT, and what is not served refused.

Each family's tiny random model (tests/support/families.py) gets two adapters with non-zero B on
every linear layer (attention only for MoE families: PEFT puts their experts in target_parameters,
refused below). Requests run alone (a single adapter merges after a few steps) and then in one mixed
batch with chunked prefill; each answer is checked against PEFT teacher-forced on the engine's own
tokens: every token is PEFT's greedy choice and every logprob within TOL of PEFT's.
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

from adapters import UnsupportedAdapterError
from server.engine.attention_probe import UnsupportedModelError, mask_window, probe_attention
from server.engine.config import EngineConfig
from server.engine.errors import PromptTooLongError
from server.engine.llm_engine import LLMEngine
from server.engine.model_families import FAMILIES as SERVED
from server.engine.model_families import check_architecture
from server.engine.model_loader import BaseModel, load_base_model
from support.engine import greedy, load_tokenizer
from support.families import ATTENTION, FAMILIES, MOE, VOCAB, adapter_kwargs, model, pristine

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
    engine = LLMEngine(base, EngineConfig(**config))
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


@torch.no_grad()
def test_gemma2_softcaps_change_the_answer_and_are_served():
    """The family test above runs Gemma 2 with caps of 5 on attention scores and on logits; here,
    that those caps matter: without them HF's logits move by far more than the tolerance."""
    ids = torch.tensor([PROMPTS[1]])
    capped = model("gemma2")(ids).logits
    uncapped = model("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)(ids).logits
    assert (capped - uncapped).abs().max() > 100 * TOL
    assert probe_attention(model("gemma2")).num_layers == 2  # served, not refused


# Sliding windows: the context is capped at the smallest window
@pytest.mark.parametrize(
    ("family", "window_fields", "windows"),
    [
        ("mistral", dict(sliding_window=8), [8, 8]),
        ("mixtral", dict(sliding_window=8), [8, 8]),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), [None, 8]),
        ("qwen3", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), [None, 8]),
        ("qwen3_moe", dict(use_sliding_window=True, sliding_window=8, max_window_layers=1), [8, 8]),  # its own rule
        ("gemma3", dict(sliding_window=8, layer_types=["sliding_attention", "full_attention"]), [8, None]),
        ("gemma2", dict(sliding_window=8), [8, None]),
        ("starcoder2", dict(sliding_window=8), [8, 8]),
        ("phi3", dict(sliding_window=8), [8, 8]),
    ],
)
def test_a_sliding_window_caps_the_context_where_every_answer_is_exact(family, window_fields, windows):
    assert [layer.window for layer in probe_attention(model(family, **window_fields)).layers] == windows
    engine = make_family_engine(family, model=window_fields)
    assert engine.max_model_len == 8
    prompt = PROMPTS[0]  # 5 tokens + 3 new: the last row sees all 8 keys, as the window lets it
    (completion,) = engine.generate([prompt], greedy(3, logprobs=0))
    with torch.no_grad():
        hf = torch.log_softmax(
            model(family, **window_fields)(torch.tensor([prompt + completion.token_ids])).logits[0], -1
        )
    expected = hf[len(prompt) - 1 : -1].gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor([entry.logprob for entry in completion.logprobs]), expected, atol=TOL)
    with pytest.raises(PromptTooLongError, match="8 tokens"):
        engine.add_request(PROMPTS[2], greedy(3))
    with pytest.raises(UnsupportedModelError, match="sliding window of 8 tokens"):
        make_family_engine(family, model=window_fields, max_model_len=16)
    assert make_family_engine(family, model=window_fields, max_model_len=6).max_model_len == 6


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


def test_moe_expert_lora_is_refused_at_upload_naming_target_parameters(tmp_path, make_peft_adapter):
    """PEFT's all-linear on an MoE family targets its experts as parameters (issue 26, item 4, not
    served yet): a typed error the HTTP table maps to 422 unsupported_adapter."""
    path = make_peft_adapter(pristine("mixtral"), tmp_path / "experts", r=4, target_modules="all-linear")
    engine = make_family_engine("mixtral")
    with pytest.raises(UnsupportedAdapterError, match="target_parameters"):
        engine.registry.add("experts", path)


def test_every_family_tested_here_is_in_the_served_table():
    tested = {AutoConfig.for_model(model_type).model_type for model_type, _ in FAMILIES.values()}
    assert tested == set(SERVED), "a served family without a test, or a test of an unserved one"
    assert set(MOE) <= set(FAMILIES) and ATTENTION
