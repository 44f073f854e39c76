"""The memory plan (server/engine/memory_plan.py) from a given budget, on the tiny Llama on CPU:
the same arithmetic a CUDA device's gpu_memory_utilization feeds it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from server.engine.config import EngineConfig
from server.engine.decode_graphs import GRAPH_WORKSPACE_BYTES, MAX_GRAPH_TERMS, buckets_for, graph_bytes, graphs_capture
from server.engine.llm_engine import LLMEngine
from server.engine.memory_plan import MemoryPlanError
from server.engine.model_loader import BaseModel, auto_dtype
from support.engine import fresh_model, greedy, load_tokenizer, make_engine

MiB = 2**20


def test_the_kv_pool_gets_what_the_budget_leaves_and_takes_exactly_that():
    engine = make_engine(memory_budget=256 * MiB)
    plan = engine.memory
    spent = plan.weights + plan.lora_slots + plan.merge_buffers + plan.activations + plan.cuda_graphs
    per_token = engine.attention.kv_bytes_per_token(torch.float32)
    assert per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, fp32
    assert plan.kv_tokens == (256 * MiB - spent) // per_token // 16 * 16 > 0
    assert plan.merge_buffers == int(0.1 * 256 * MiB)  # the default share of a budget
    model = fresh_model()  # it ties nothing; its buffers are RoPE's frequencies
    assert plan.weights == sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    assert engine.cache.capacity_tokens == plan.kv_tokens
    assert sum(pool.nbytes for pool in engine.cache.k + engine.cache.v) == plan.kv_cache
    assert engine.stats().memory_plan == plan.parts() and plan.parts()["budget"] == 256 * MiB


def test_adapter_slots_never_take_more_than_the_plan_counted(tmp_path, make_peft_adapter):
    """Slots fill lazily; the plan counts them full, so loading adapters never eats the KV's share."""
    full = {
        f"r{i}": make_peft_adapter(fresh_model(), tmp_path / f"r{i}", r=8, target_modules="all-linear")
        for i in range(2)
    }
    engine = make_engine(full, memory_budget=256 * MiB, max_loras=2, max_lora_rank=8)
    engine.generate(["Hello", "Hi"], greedy(2), adapters=["r0", "r1"])
    allocated = sum(
        layer.lora_a.nbytes + layer.lora_b.nbytes
        for layer in engine.lora_model.layers.values()
        if layer.lora_a is not None
    )
    assert 0 < allocated <= engine.memory.lora_slots


def test_a_budget_too_small_or_a_pool_too_large_is_refused_naming_what_to_change():
    with pytest.raises(MemoryPlanError, match="minimum KV pool of 1,024 tokens does not fit.*gpu-memory-utilization"):
        make_engine(memory_budget=64 * MiB)
    with pytest.raises(MemoryPlanError, match="kv_cache_tokens 1,000,000 does not fit"):
        make_engine(memory_budget=256 * MiB, kv_cache_tokens=1_000_000)
    assert make_engine(memory_budget=256 * MiB, kv_cache_tokens=2048).cache.capacity_tokens == 2048


def test_without_a_budget_the_pool_is_what_was_asked_and_merges_are_unlimited():
    engine = make_engine()
    assert engine.cache.capacity_tokens == 16384 and engine.memory.budget is None
    assert engine.lora_model.merge_budget is None
    assert make_engine(kv_cache_tokens=512).cache.capacity_tokens == 512


def _layer_bytes(engine, names: tuple[str, ...]) -> int:
    layers = engine.lora_model.layers
    return sum(layers[name].weight_bytes for name in layers if name.rsplit(".", 1)[-1] in names)


def test_an_adapter_past_merge_memory_is_served_gathered_with_the_same_tokens(tmp_path, make_peft_adapter):
    big = {"all": make_peft_adapter(fresh_model(), tmp_path / "all", r=4, target_modules="all-linear")}
    prompts, params = ["The quick brown fox jumps over"], greedy(12)
    unlimited = make_engine(big)
    expected = unlimited.generate(prompts, params, adapters=["all"])
    assert unlimited.stats().steps_by_mode["merged"] > 0  # one adapter alone merges after a few steps

    proj = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    budget = _layer_bytes(unlimited, proj) - 1  # one byte short of its merge
    limited = make_engine(big, merge_memory=budget)
    got = limited.generate(prompts, params, adapters=["all"])
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    stats = limited.stats()
    assert stats.steps_by_mode["merged"] == 0 and stats.steps_by_mode["gather"] > 0
    assert stats.merge_buffer_bytes == 0 and stats.num_swaps == 0


def test_merges_that_fit_alone_free_the_buffers_others_left(tmp_path, make_peft_adapter):
    adapters = {
        "attn": make_peft_adapter(fresh_model(), tmp_path / "attn", r=4, target_modules=["q_proj", "o_proj"]),
        "mlp": make_peft_adapter(fresh_model(), tmp_path / "mlp", r=4, target_modules=["down_proj"]),
    }
    probe = make_engine()
    attn, mlp = _layer_bytes(probe, ("q_proj", "o_proj")), _layer_bytes(probe, ("down_proj",))
    engine = make_engine(adapters, merge_memory=max(attn, mlp))
    seen = []
    engine.step_listeners.append(lambda stats: seen.append(engine.lora_model.merge_buffer_bytes))
    for name, size in (("attn", attn), ("mlp", mlp), ("attn", attn)):
        engine.generate(["Once upon a time"], greedy(10), adapters=[name])
        assert engine.lora_model.merge_buffer_bytes == size  # the other's buffers were given back
    assert engine.stats().num_swaps == 3
    assert max(seen) <= max(attn, mlp)


def test_dtype_auto_is_a_half_dtype_on_cuda_and_float32_elsewhere():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert auto_dtype(LlamaConfig(dtype="float16"), cuda) == torch.float16
    assert auto_dtype(LlamaConfig(dtype="float32"), cuda) == torch.bfloat16
    assert auto_dtype(LlamaConfig(), cuda) == torch.bfloat16
    assert auto_dtype(LlamaConfig(dtype="bfloat16"), cpu) == torch.float32


def dynamic_rope_model() -> LlamaForCausalLM:
    """The tiny model with "dynamic" RoPE: its rotary update compares the longest position on the host."""
    config = copy.deepcopy(fresh_model().config)
    config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def test_graph_memory_is_the_logits_each_captured_bucket_keeps():
    """An 8B-class vocabulary (128,256) at 256 sequences in bf16: each graph keeps its [bucket, V]
    logits, 0.56 GB per captured depth over the 18 buckets; the old fixed 256 MiB held a fifth of it."""
    rows = sum(buckets_for(256))
    assert rows == 1 + 2 + 4 + 8 + sum(range(16, 257, 16))
    got = graph_bytes(256, 128_256, torch.bfloat16)
    assert got == rows * 128_256 * 2 * (MAX_GRAPH_TERMS + 1) + GRAPH_WORKSPACE_BYTES
    assert got > 3 * 0.56e9 and graph_bytes(256, 32_000, torch.bfloat16) < got  # the vocabulary counts


def test_only_families_whose_decode_is_captured_reserve_graphs_and_turn_merges_off():
    assert graphs_capture(fresh_model())
    assert not graphs_capture(dynamic_rope_model())  # would fail capture at startup: runs eagerly
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64))
    assert not graphs_capture(gpt2)  # no lean pass: the stock forward is never captured
    config = EngineConfig(step_kernels="triton", decode_graphs=True, memory_budget=256 * MiB)
    engine = LLMEngine(BaseModel(dynamic_rope_model(), load_tokenizer(), "tiny", Path("tiny")), config)
    assert engine.memory.merge_buffers == int(0.1 * 256 * MiB) and engine.memory.cuda_graphs == 0
    assert not engine.runner.graphs.capture
    eager = LLMEngine(BaseModel(dynamic_rope_model(), load_tokenizer(), "tiny", Path("tiny")), EngineConfig())
    prompt = ["The quick brown fox jumps over the lazy dog"]
    assert engine.generate(prompt, greedy(6))[0].token_ids == eager.generate(prompt, greedy(6))[0].token_ids
