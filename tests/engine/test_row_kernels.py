"""The CUDA step path, run on CPU: the Triton row kernels (in Triton's interpreter here, on the GPU
there) and the decode graphs' static buffers (run eagerly off CUDA: what is checked is their
bookkeeping, padding and slot data). PEFT is the reference, as for the torch path."""

from __future__ import annotations

import pytest
import torch

from server.engine import decode_graphs
from support.engine import PROMPTS, encode, fresh_model, greedy, hf_greedy, make_engine, peft_reference
from support.peft import make_trained_adapter

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 6
TWO = (("a", 0.5), ("b", 1.0))
MIXED = [(PROMPTS[0], None, 8), (PROMPTS[0], "a", 8), (PROMPTS[1], "b", 6), (LONG_PROMPT, "a", 5), (PROMPTS[2], "b", 7)]
CPU_PATH = dict(step_kernels="torch", decode_graphs=False)


def generate(engine, requests):
    prompts, params, adapters = zip(*[(p, greedy(n), a) for p, a, n in requests])
    return [c.token_ids for c in engine.generate(list(prompts), list(params), list(adapters))]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_a_mixed_batch_on_the_row_kernels_equals_peft(adapter_paths, graphs):
    # A 24-token step budget chunks the long prompt, so prefill rows of one sequence span steps.
    engine = make_engine(adapter_paths, step_kernels="triton", decode_graphs=graphs, max_num_batched_tokens=24)
    assert engine.runner.row_kernels and (engine.runner.graphs is not None) == graphs
    got = generate(engine, MIXED)
    reference = peft_reference(adapter_paths)
    for (prompt, adapter, n), tokens in zip(MIXED, got):
        assert tokens == hf_greedy(reference, encode(prompt), n, adapter), (prompt, adapter)
    if graphs:
        # 5 decoding rows pad to a bucket of 8; as they finish, smaller buckets serve the rest.
        assert (8, 1) in engine.runner.graphs.replays


def test_compositions_replay_the_same_bookkeeping_as_the_torch_path(adapter_paths):
    requests = [(PROMPTS[0], TWO, 8), (PROMPTS[1], "a", 8), (PROMPTS[3], None, 8), (PROMPTS[2], (("b", -0.5),), 6)]
    expected = generate(make_engine(adapter_paths, **CPU_PATH), requests)
    engine = make_engine(adapter_paths, step_kernels="triton", decode_graphs=True)
    graphs, state = engine.runner.graphs, engine.lora_model.state
    made_for = graphs.layout
    assert generate(engine, requests) == expected
    # Loading the adapters allocated slot buffers: graphs made before them would skip their LoRA ops
    # (on CUDA a replay does not re-run the Python that decides it), so they were made again.
    assert state.layout_version > made_for and graphs.layout == state.layout_version
    assert {depth for _, depth in graphs.replays} == {2}  # one graph depth serves every mix of the step
    assert engine.stats().steps_by_mode["merged"] == 0


def test_padding_rows_write_only_the_scratch_page(adapter_paths):
    engine = make_engine(adapter_paths, step_kernels="triton", decode_graphs=True)
    cache = engine.cache
    assert cache.k[0].shape[1] == cache.capacity_tokens + 16  # the scratch page sits past the pool
    got = generate(engine, [(PROMPTS[0], "a", 6), (PROMPTS[1], None, 6), (PROMPTS[2], "b", 6)])  # bucket 4
    assert got == generate(
        make_engine(adapter_paths, **CPU_PATH), [(PROMPTS[0], "a", 6), (PROMPTS[1], None, 6), (PROMPTS[2], "b", 6)]
    )
    assert bool(cache.k[0][:, cache.scratch_token].any())  # the padding row's K went there


def test_dora_and_bias_adapters_on_the_row_kernels_equal_the_torch_path(tmp_path, make_peft_adapter):
    """PEFT refuses mixed batches with DoRA (`adapter_names`); the torch path is checked against
    PEFT for DoRA and LoRA biases one adapter at a time (tests/adapters/test_peft_variants.py)."""
    paths = {
        "dora": make_trained_adapter(
            fresh_model(), tmp_path / "dora", r=4, target_modules=["q_proj", "down_proj"], use_dora=True
        ),
        "bias": make_trained_adapter(
            fresh_model(), tmp_path / "bias", r=4, target_modules=["v_proj", "up_proj"], lora_bias=True
        ),
    }
    requests = [(PROMPTS[0], "dora", 6), (PROMPTS[1], "bias", 6), (PROMPTS[2], None, 6), (PROMPTS[3], "dora", 4)]
    expected = generate(make_engine(paths, **CPU_PATH), requests)
    for graphs in (False, True):
        assert generate(make_engine(paths, step_kernels="triton", decode_graphs=graphs), requests) == expected
    # a slot reloaded without DoRA or bias must not keep the old adapter's terms in the kernels' tables
    engine = make_engine(paths, step_kernels="triton", max_loras=1)
    generate(engine, [(PROMPTS[0], "dora", 2)])
    engine.registry.add("plain", make_peft_adapter(fresh_model(), tmp_path / "plain", r=4, target_modules=["q_proj"]))
    alone = make_engine({"plain": tmp_path / "plain"}, **CPU_PATH)
    assert generate(engine, [(PROMPTS[1], "plain", 6)]) == generate(alone, [(PROMPTS[1], "plain", 6)])


def test_embedding_adapters_run_eagerly_with_graphs_on(tmp_path, make_peft_adapter):
    paths = {"emb": make_peft_adapter(fresh_model(), tmp_path / "emb", r=4, target_modules=["embed_tokens", "q_proj"])}
    requests = [(PROMPTS[0], "emb", 6), (PROMPTS[1], None, 12)]  # the base row decodes alone at the end
    engine = make_engine(paths, step_kernels="triton", decode_graphs=True)
    got = generate(engine, requests)
    reference = peft_reference(paths)
    for (prompt, adapter, n), tokens in zip(requests, got):
        assert tokens == hf_greedy(reference, encode(prompt), n, adapter)
    assert engine.runner.graphs.replays and all(depth == 0 for _, depth in engine.runner.graphs.replays)
    # only the steps where the base request decoded alone went through the graphs


def test_graphs_turn_merges_off_unless_merge_memory_asks(adapter_paths):
    engine = make_engine(adapter_paths, step_kernels="triton", decode_graphs=True, memory_budget=256 * 2**20)
    assert engine.memory.merge_buffers == 0 and engine.memory.cuda_graphs == 0  # nothing is captured off CUDA
    engine.generate([PROMPTS[0]], greedy(10), ["a"])
    assert engine.stats().steps_by_mode["merged"] == 0


def test_the_triton_path_off_cuda_needs_the_interpreter_said_out_loud(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        make_engine(step_kernels="triton")
    assert not make_engine().runner.row_kernels  # auto: the torch path off CUDA


def test_a_decode_step_fills_only_the_terms_of_its_own_depth(adapter_paths, monkeypatch):
    """The static inputs' host lists are (2 + depth) × bucket: the old ones were (2 + max_loras) ×
    bucket whatever the step held."""
    engine = make_engine(adapter_paths, step_kernels="triton", decode_graphs=True, max_loras=8)
    built = []

    class RecordingTorch:
        def __getattr__(self, name):
            return getattr(torch, name)

        def tensor(self, data, *args, **kwargs):
            built.append((len(data), kwargs.get("dtype")))
            return torch.tensor(data, *args, **kwargs)

    monkeypatch.setattr(decode_graphs, "torch", RecordingTorch())
    generate(engine, [(PROMPTS[0], "a", 4), (PROMPTS[1], None, 4)])
    int_lists = [rows for rows, dtype in built if dtype == torch.int32]
    assert int_lists and set(int_lists) <= {2, 3}  # KV start and length, then one term: depth 1
