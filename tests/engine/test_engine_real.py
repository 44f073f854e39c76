"""Acceptance on the real default model: a mixed batch of 25 concurrent requests over 4 adapters
plus the base gives, token for token, what HF/PEFT `generate` gives for each prompt alone."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from transformers import GenerationConfig

from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_loader import load_base_model
from server.engine.sampling_params import SamplingParams
from support.engine import MERGE_SOON

pytestmark = pytest.mark.real_model

ADAPTERS = {  # name -> (rank, targets): different ranks and targets in one batch
    "qv8": (8, ["q_proj", "v_proj"]),
    "attn16": (16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp4": (4, ["gate_proj", "up_proj", "down_proj"]),
    "mix32": (32, ["q_proj", "o_proj", "down_proj"]),
}
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three colors:",
    "Once upon a time",
]
NUM_TOKENS = 16


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, default_model, make_peft_adapter):
    root = tmp_path_factory.mktemp("real-adapters")
    return {
        name: make_peft_adapter(default_model.model, root / name, r=rank, lora_alpha=2 * rank, target_modules=targets)
        for name, (rank, targets) in ADAPTERS.items()
    }


@pytest.fixture(scope="module")
def requests_and_references(default_model, adapter_dirs):
    """Every prompt with every adapter and the base (25 requests, interleaved), and each one's
    greedy tokens from PEFT/HF generate, run alone."""
    pairs = [(prompt, adapter) for prompt in PROMPTS for adapter in [None, *ADAPTERS]]
    names = list(ADAPTERS)
    model = copy.deepcopy(default_model.model)
    # The engine runs with ignore_eos: the reference must not stop at EOS either. A None in the
    # GenerationConfig passed to generate() falls back to this model-level default, so clear it here.
    model.generation_config.eos_token_id = None
    reference = peft.PeftModel.from_pretrained(model, adapter_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        reference.load_adapter(adapter_dirs[name], adapter_name=name)
    greedy = GenerationConfig(
        max_new_tokens=NUM_TOKENS, do_sample=False, pad_token_id=default_model.tokenizer.eos_token_id
    )
    expected = []
    for prompt, adapter in pairs:
        ids = default_model.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            if adapter is None:
                with reference.disable_adapter():
                    out = reference.generate(ids, generation_config=greedy)
            else:
                reference.set_adapter(adapter)
                out = reference.generate(ids, generation_config=greedy)
        expected.append(out[0, ids.shape[1] :].tolist())
    return pairs, expected


def run_engine(adapter_dirs, pairs, **config):
    engine = LLMEngine(load_base_model(), EngineConfig(**MERGE_SOON | config))
    for name, path in adapter_dirs.items():
        engine.registry.add(name, path)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    outputs = engine.generate([p for p, _ in pairs], params, [a for _, a in pairs])
    return engine, [o.token_ids for o in outputs]


def test_adapters_change_the_output(requests_and_references):
    pairs, expected = requests_and_references
    base_out = {p: e for (p, a), e in zip(pairs, expected) if a is None}
    for name in ADAPTERS:
        assert any(e != base_out[p] for (p, a), e in zip(pairs, expected) if a == name), name


def test_mixed_batch_equals_peft_token_for_token(adapter_dirs, requests_and_references):
    pairs, expected = requests_and_references
    engine, got = run_engine(adapter_dirs, pairs)
    assert got == expected
    stats = engine.stats()
    assert stats.steps_by_mode["gather"] > 0
    assert stats.kv_reserved_tokens == 0


def test_equal_under_preemption(adapter_dirs, requests_and_references):
    pairs, expected = requests_and_references
    engine, got = run_engine(adapter_dirs, pairs, kv_cache_tokens=256)
    assert engine.stats().num_preemptions > 0
    assert got == expected
