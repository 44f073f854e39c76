"""The oneDNN-packed CPU path: same results as the plain path, used only where it applies, and
merges that pack their merged weight (PEFT parity of the packed path is in test_peft_equivalence)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from adapters import AdapterRegistry, wrap_model
from adapters.backends.cpu import PACKABLE_DTYPES, can_pack, pack, packed_linear
from adapters.batch import LoraBatch
from adapters.kernels import PACKED, PLAIN, KernelPlan
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import BaseModel
from support.engine import MERGE_SOON, PROMPTS, fresh_model, greedy, load_tokenizer

pytestmark = pytest.mark.skipif(not can_pack(torch.zeros(1, 1)), reason="this torch build has no oneDNN linear")


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (1, 64)])
@pytest.mark.parametrize("rows", [1, 7, 200])
def test_packed_linear_equals_linear(shape, rows):
    weight, bias = torch.randn(*shape), torch.randn(shape[0])
    x = torch.randn(2, rows, shape[1])
    torch.testing.assert_close(packed_linear(x, pack(weight), bias), nn.functional.linear(x, weight, bias))
    torch.testing.assert_close(packed_linear(x[0], pack(weight), None), x[0] @ weight.T)


@pytest.mark.parametrize("shape", [(48, 64), (960, 576)])
@pytest.mark.parametrize("rows", [1, 16, 64])
@pytest.mark.skipif(torch.bfloat16 not in PACKABLE_DTYPES, reason="oneDNN has no bf16 kernels for this CPU")
def test_bf16_packed_linear_is_as_exact_as_bf16_allows(shape, rows):
    """Packed and F.linear in bf16 both accumulate in fp32 and round the output to bf16: each is
    within half a bf16 ulp of the exact product plus fp32 accumulation error (K terms)."""
    weight, x = torch.randn(*shape).bfloat16(), torch.randn(rows, shape[1]).bfloat16()
    exact = x.double() @ weight.double().T
    magnitude = x.double().abs() @ weight.double().abs().T
    bound = torch.finfo(torch.bfloat16).eps / 2 * exact.abs() + shape[1] * torch.finfo(torch.float32).eps * magnitude
    for y in (packed_linear(x, pack(weight), None), nn.functional.linear(x, weight)):
        assert y.dtype == torch.bfloat16
        assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_only_float32_and_supported_bf16_on_cpu_are_packed(tiny_llama, dtype):
    is_packed = dtype in PACKABLE_DTYPES
    assert (pack(torch.randn(4, 4, dtype=dtype)) is not None) == is_packed
    lora_model = wrap_model(copy.deepcopy(tiny_llama).to(dtype), max_loras=2, max_rank=8, kernels=KernelPlan(PACKED))
    embedding = lora_model.model.get_input_embeddings()
    assert all(
        (layer.packed_weight is not None) == is_packed for layer in lora_model.layers.values() if layer is not embedding
    )


def test_conv1d_layers_are_left_to_the_plain_path(tiny_gpt2):
    lora_model = wrap_model(copy.deepcopy(tiny_gpt2), max_loras=2, max_rank=8, kernels=KernelPlan(PACKED))
    head, embedding = lora_model.model.lm_head, lora_model.model.get_input_embeddings()
    assert all(
        layer.is_conv1d and layer.packed_weight is None
        for layer in lora_model.layers.values()
        if layer not in (head, embedding)
    )
    assert head.is_head and head.packed_weight is not None  # GPT-2's head is an nn.Linear


def test_packed_model_equals_plain_model_and_keeps_tied_weights(tiny_llama, token_ids):
    plain = wrap_model(copy.deepcopy(tiny_llama), max_loras=2, max_rank=8)
    packed = wrap_model(copy.deepcopy(tiny_llama), max_loras=2, max_rank=8, kernels=KernelPlan(PACKED))
    head = packed.model.lm_head
    assert head.is_head and head.packed_weight is not None
    assert head.weight is packed.model.get_input_embeddings().weight or not tiny_llama.config.tie_word_embeddings
    embedding = packed.model.get_input_embeddings()
    assert all(layer.packed_weight is not None for layer in packed.layers.values() if layer is not embedding)
    with torch.no_grad():
        torch.testing.assert_close(packed.model(token_ids).logits, plain.model(token_ids).logits)
        torch.testing.assert_close(packed.model(token_ids).logits, tiny_llama(token_ids).logits)


def test_merge_packs_the_merged_weight_and_unmerge_returns_to_w0(tiny_llama, token_ids, tmp_path, make_peft_adapter):
    path = make_peft_adapter(tiny_llama, tmp_path / "a", r=4, target_modules=["q_proj", "down_proj"])
    models = [
        wrap_model(copy.deepcopy(tiny_llama), max_loras=2, max_rank=8, kernels=KernelPlan(kernel))
        for kernel in (PLAIN, PACKED)
    ]
    slots = []
    for lora_model in models:
        registry = AdapterRegistry(lora_model)
        registry.add("a", path)
        slots.append(registry.acquire("a").slot)
    plain, packed = models
    with torch.no_grad():
        base = packed.model(token_ids).logits
        for lora_model, slot in zip(models, slots):
            lora_model.merge(slot)
        q = packed.layers["model.layers.0.self_attn.q_proj"]
        k = packed.layers["model.layers.0.self_attn.k_proj"]
        assert q.merged_weight is not None and q.merged_kernel.packed is not None
        assert k.merged_weight is None and k.merged_kernel is None  # not a target: stays on packed W0
        merged = packed.model(token_ids).logits
        torch.testing.assert_close(merged, plain.model(token_ids).logits)
        batch = LoraBatch.build(torch.full((token_ids.numel(),), slots[1]))
        packed.unmerge()
        with packed.gather(batch):
            torch.testing.assert_close(packed.model(token_ids).logits, merged)
        assert q.merged_kernel is None
        assert torch.equal(packed.model(token_ids).logits, base)


@pytest.mark.skipif(torch.bfloat16 not in PACKABLE_DTYPES, reason="oneDNN has no bf16 kernels for this CPU")
def test_bf16_engine_serves_on_packed_weights_as_on_plain_ones(adapter_paths):
    """End to end in bf16: KV cache in bf16, logprobs from fp32 logits, gathered and merged rows; the
    tiny model's greedy argmaxes are far apart, so both kernels give the same tokens."""
    prompts, adapters = PROMPTS, [None, "a", "b", "a"]
    tokens = []
    for kernel_choice in (PACKED, PLAIN):
        engine = bf16_engine(adapter_paths, kernel_choice=kernel_choice)
        assert engine.cache.k[0].dtype == torch.bfloat16
        assert (engine.lora_model.model.lm_head.packed_weight is not None) == (kernel_choice == PACKED)
        completions = engine.generate(prompts, greedy(8, logprobs=1), adapters)
        assert all(math.isfinite(lp.logprob) for c in completions for lp in c.logprobs)
        merged = bf16_engine(adapter_paths, kernel_choice=kernel_choice, merge_after_steps=1)
        merged_tokens = [c.token_ids for c in merged.generate(prompts[1::2], greedy(8), ["a", "a"])]
        assert merged.stats().steps_by_mode["merged"] > 0
        tokens.append(([c.token_ids for c in completions], merged_tokens))
    assert tokens[0] == tokens[1]


def bf16_engine(adapter_paths, **config) -> LLMEngine:
    engine = LLMEngine(
        BaseModel(fresh_model().to(torch.bfloat16), load_tokenizer(), "tiny", Path("tiny")),
        EngineConfig(**MERGE_SOON | config),
    )
    for name, path in adapter_paths.items():
        engine.registry.add(name, path)
    return engine
