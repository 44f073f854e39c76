"""The compiled CPU decode step (server/engine/compiled_step.py) against the eager pass and PEFT.

One engine compiles its decode step (tiny Llama, 2 layers: one graph for one-row steps, ~10-30 s
of inductor here; steps of more rows run eagerly); an eager engine on a copy of the same model runs the
same requests. Greedy tokens equal PEFT's; logprobs equal the eager engine's and PEFT's within the
suite's fp32 bound (inductor fuses the norms and rotary into its own loops, which reorders a few
sums: measured |Δ logprob| below 1e-5 on this model). Merges and unmerges swap the weights the
graph reads without a recompilation, and neither do steps of other row counts or adapter mixes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils

from server.engine.compiled_step import (
    DENSE_ROWS,
    MAX_CONTEXT,
    _identity,
    _inductor_dir,
    _write_verdict,
    compiled_path,
)
from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_loader import BaseModel
from support.engine import (
    PROMPTS,
    encode,
    fresh_model,
    greedy,
    hf_greedy,
    hf_logprobs,
    load_tokenizer,
    make_engine,
    peft_reference,
    run_steps,
)

LOGPROB_BOUND = 1e-4  # the suite's fp32 bound against PEFT


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compiled-cache")


@pytest.fixture(scope="module", params=["plain", "packed"])
def engines(request, tiny_adapter_paths, cache_dir):
    """(compiled, eager) engines; merging after one step, so a lone request runs merged. Under the
    packed kernels q/k/v and gate/up are fused groups, each one projection of the graph."""
    config = dict(merge_after_steps=1, kernel_choice=request.param)
    compiled = make_engine(tiny_adapter_paths, compile_decode="on", cache_dir=cache_dir, **config)
    eager = make_engine(tiny_adapter_paths, **config)
    assert compiled.runner.compiled is not None and eager.runner.compiled is None
    assert bool(compiled.runner.lean.fused) == (request.param == "packed")
    return compiled, eager


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _assert_logprobs_close(ours, theirs):
    assert [t.token_id for t in ours] == [t.token_id for t in theirs]
    for a, b in zip(ours, theirs):
        assert abs(a.logprob - b.logprob) <= LOGPROB_BOUND, (a, b)


@pytest.mark.parametrize("adapter", [None, "a"])
def test_one_stream_matches_eager_and_peft(engines, adapter_paths, adapter):
    """One request alone: base, or an adapter merged into the weights the graph reads."""
    compiled, eager = engines
    before = compiled.runner.compiled.num_steps
    params = greedy(10, logprobs=1)
    (ours,) = compiled.generate([PROMPTS[0]], params, [adapter])
    (theirs,) = eager.generate([PROMPTS[0]], params, [adapter])
    assert compiled.runner.compiled.num_steps - before >= 8, "the decode steps did not run compiled"
    if adapter is not None:
        assert compiled.stats().steps_by_mode.get("merged"), "the lone adapter request never merged"
    assert ours.token_ids == theirs.token_ids
    _assert_logprobs_close(ours.logprobs, theirs.logprobs)

    reference = peft_reference(adapter_paths)
    prompt = encode(PROMPTS[0])
    assert ours.token_ids == hf_greedy(reference, prompt, 10, adapter)
    with reference.disable_adapter() if adapter is None else contextlib.nullcontext():
        if adapter is not None:
            reference.set_adapter(adapter)
        expected = hf_logprobs(reference, prompt + ours.token_ids)
    for i, logprob in enumerate(ours.logprobs):
        assert abs(logprob.logprob - float(expected[len(prompt) - 1 + i, logprob.token_id])) <= LOGPROB_BOUND


def test_batched_base_rows_and_mixed_steps_match_peft(engines, adapter_paths):
    """Three base rows decode together (eagerly: the graph serves one row); a mixed batch of
    adapters gathers per row and runs eagerly, then its last survivor merges and runs compiled."""
    compiled, eager = engines
    adapters = [None, None, None, "a", "b", None]
    lengths = [6, 6, 6, 4, 4, 9]
    params = [greedy(n, logprobs=1) for n in lengths]
    ours = compiled.generate(PROMPTS[:3] + PROMPTS[:3], params, adapters)
    theirs = eager.generate(PROMPTS[:3] + PROMPTS[:3], params, adapters)
    reference = peft_reference(adapter_paths)
    for prompt, adapter, n, a, b in zip(PROMPTS[:3] * 2, adapters, lengths, ours, theirs):
        assert a.token_ids == b.token_ids == hf_greedy(reference, encode(prompt), n, adapter)
        _assert_logprobs_close(a.logprobs, b.logprobs)


def test_no_recompilation_across_steps_row_counts_and_merges(engines):
    """After the startup warm-up, no step compiles: not a new row count, not a merge of either
    adapter, not an unmerge back to the base."""
    compiled, _ = engines
    graphs, steps = _graphs(), compiled.runner.compiled.num_steps
    for adapter in ("a", "b", None, "a"):
        compiled.generate([PROMPTS[1]], greedy(5), [adapter])  # each lone adapter merges (a swap)
    compiled.generate(PROMPTS, greedy(4), [None] * 4)  # 4 rows, then fewer as they finish
    requests = [compiled.add_request(PROMPTS[i % 4], greedy(3 + i)) for i in range(5)]
    run_steps(compiled)
    assert all(r.output_token_ids for r in requests)
    assert compiled.stats().num_swaps >= 3
    assert compiled.runner.compiled.num_steps - steps >= 12
    assert _graphs() == graphs, "a decode step recompiled"


@pytest.fixture(scope="module")
def gathering(tiny_adapter_paths, cache_dir, make_peft_adapter, tmp_path_factory):
    """(compiled, eager) engines that never merge, so a lone adapter request gathers all along, and
    the adapter paths: "a" and "b", and "c" of rank 12 (the LoRA graph's rows padded to 16, where the
    warm-up's were 8) on two projections only."""
    from support.engine import pristine_model

    paths = dict(tiny_adapter_paths)
    c = dict(r=12, lora_alpha=6, target_modules=["o_proj", "up_proj"])
    paths["c"] = make_peft_adapter(pristine_model(), tmp_path_factory.mktemp("rank-12") / "c", **c)
    config = dict(merge_after_steps=10**6)
    compiled = make_engine(paths, compile_decode="on", cache_dir=cache_dir, **config)
    eager = make_engine(paths, **config)
    return compiled, eager, paths


@pytest.mark.parametrize("adapter", ["a", "b", "c"])
def test_a_stream_on_an_unmerged_adapter_runs_the_lora_graph_as_eager_and_peft_do(gathering, adapter):
    """A lone request on an adapter that is not merged: its decode steps go through the LoRA graph
    (its slot's rows, of whatever rank and targets), with no graph compiled after the warm-up."""
    compiled, eager, paths = gathering
    graphs, before = _graphs(), compiled.runner.compiled.num_lora_steps
    params = greedy(10, logprobs=1)
    (ours,) = compiled.generate([PROMPTS[2]], params, [adapter])
    (theirs,) = eager.generate([PROMPTS[2]], params, [adapter])
    assert compiled.runner.compiled.num_lora_steps - before >= 8, "the decode steps did not run the LoRA graph"
    assert not compiled.stats().steps_by_mode.get("merged")
    assert _graphs() == graphs, "an adapter recompiled the LoRA graph"
    assert ours.token_ids == theirs.token_ids
    _assert_logprobs_close(ours.logprobs, theirs.logprobs)

    reference = peft_reference(paths)
    reference.set_adapter(adapter)
    prompt = encode(PROMPTS[2])
    assert ours.token_ids == hf_greedy(reference, prompt, 10, adapter)
    expected = hf_logprobs(reference, prompt + ours.token_ids)
    for i, logprob in enumerate(ours.logprobs):
        assert abs(logprob.logprob - float(expected[len(prompt) - 1 + i, logprob.token_id])) <= LOGPROB_BOUND


def test_linears_no_adapter_targets_read_zero_rows(gathering, cache_dir):
    """On an engine where only "c" (o_proj and up_proj) was ever loaded, the other linears have no
    LoRA buffers: the graph reads shared zero rows for them, and still equals PEFT."""
    _, _, paths = gathering
    engine = make_engine({"c": paths["c"]}, compile_decode="on", cache_dir=cache_dir, merge_after_steps=10**6)
    graphs = _graphs()
    (ours,) = engine.generate([PROMPTS[1]], greedy(8), ["c"])
    assert engine.runner.compiled.num_lora_steps >= 7 and _graphs() == graphs
    assert engine.lora_model.layers["model.layers.0.self_attn.q_proj"].lora_a is None
    assert ours.token_ids == hf_greedy(peft_reference({"c": paths["c"]}), encode(PROMPTS[1]), 8, "c")


def test_a_slot_the_lora_graph_cannot_serve_gathers_eagerly(gathering):
    """An adapter at a scale other than 1 (a composition's term) is not one the LoRA graph serves:
    its steps gather eagerly, and still equal the eager engine's."""
    compiled, eager, _ = gathering
    before = compiled.runner.compiled.num_lora_steps
    scaled = [(("a", 0.5),)]
    (ours,) = compiled.generate([PROMPTS[3]], greedy(6, logprobs=1), scaled)
    (theirs,) = eager.generate([PROMPTS[3]], greedy(6, logprobs=1), scaled)
    assert compiled.runner.compiled.num_lora_steps == before
    assert ours.token_ids == theirs.token_ids
    _assert_logprobs_close(ours.logprobs, theirs.logprobs)


@pytest.mark.parametrize("adapter", [None, "a"])
def test_a_one_token_prompt_takes_its_first_step_eagerly(gathering, adapter):
    """A one-token prompt's first step sees one key, a length the graphs do not serve (a guard
    failed there, and under the stance that skips guards that failed the step and every request in
    it): it runs eagerly, the steps after it compiled, on the base and on an unmerged adapter."""
    compiled, _, paths = gathering
    prompt = encode("x")
    assert len(prompt) == 1
    before = compiled.runner.compiled.num_steps
    (ours,) = compiled.generate([prompt], greedy(6), [adapter])
    assert compiled.runner.compiled.num_steps - before == 5
    assert ours.token_ids == hf_greedy(peft_reference(paths), prompt, 6, adapter)


def test_a_context_past_the_graphs_range_decodes_eagerly(adapter_paths, cache_dir):
    """Past MAX_CONTEXT keys a graph's guard on the reduction's length fails (inductor sums longer
    float reductions in chunks): those steps run eagerly and equal the eager engine's."""
    config = dict(kv_cache_tokens=MAX_CONTEXT + 64, max_model_len=MAX_CONTEXT + 64, max_num_batched_tokens=2048)
    compiled = make_engine(adapter_paths, compile_decode="on", cache_dir=cache_dir, **config)
    eager = make_engine(adapter_paths, **config)
    prompt = (encode(" ".join(PROMPTS)) * 400)[: MAX_CONTEXT - 2]  # decode rows see 4095 to 4098 keys
    before = compiled.runner.compiled.num_steps
    outs = [engine.generate([prompt], greedy(5, logprobs=1), ["a"])[0] for engine in (compiled, eager)]
    assert compiled.runner.compiled.num_steps - before == 2, "steps within the range ran compiled, the others not"
    assert outs[0].token_ids == outs[1].token_ids
    _assert_logprobs_close(outs[0].logprobs, outs[1].logprobs)


def test_enforce_eager_turns_the_compiled_step_off(adapter_paths, cache_dir):
    engine = make_engine(adapter_paths, compile_decode="on", enforce_eager=True, cache_dir=cache_dir)
    assert engine.runner.compiled is None


def test_auto_follows_the_verdict_cached_for_this_cpu(cache_dir):
    """A verdict measured here (compiled no faster) is kept: auto starts eager without compiling."""
    probe = make_engine(cache_dir=cache_dir)
    model = probe.lora_model.model
    verdict = {"max_rows": 0, "ms": {"1": {"eager": 1.0, "compiled": 1.2}}}
    _write_verdict(compiled_path(cache_dir, _identity(model)), _identity(model), verdict)
    graphs = _graphs()
    engine = make_engine(compile_decode="auto", cache_dir=cache_dir)
    assert engine.runner.compiled is None and _graphs() == graphs


def test_a_verdict_cached_for_another_graph_is_measured_again(cache_dir, caplog):
    """A verdict of eager written before the graph changed (its identity without this graph's
    version) does not keep auto eager: the new graph is compiled and measured."""
    probe = make_engine(cache_dir=cache_dir)
    current = _identity(probe.lora_model.model)
    earlier = {key: value for key, value in current.items() if key != "graph"}
    path = compiled_path(cache_dir, current)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"identity": earlier, "verdict": {"max_rows": 0, "ms": {}}}))
    with caplog.at_level(logging.INFO, logger="server.engine.compiled_step"):
        make_engine(compile_decode="auto", cache_dir=cache_dir)
    assert "compiled the decode step" in caplog.text, "auto followed a verdict measured on another graph"
    assert "compiled measured no faster" not in caplog.text


def test_a_cache_inductor_cannot_write_sends_its_code_to_the_temporary_directory(tmp_path):
    writable = _inductor_dir(tmp_path)
    assert writable == tmp_path / "inductor" and writable.is_dir()
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a directory cannot be made under a file: as unwritable as a read-only mount
    fallback = _inductor_dir(blocked)
    assert fallback.parent == Path(tempfile.gettempdir()) and fallback.name.startswith("loraserve-inductor")


def test_auto_caches_a_verdict_only_when_the_machine_was_quiet(tmp_path, monkeypatch):
    """Under load eager and compiled slow unequally, so a verdict measured then serves that start and
    is not cached; a quiet measurement is cached with its conditions. The reference matmul's timings
    are set (timing the real one on a shared machine is not controllable): load that comes and goes
    within the measurement makes one bracket between its rounds 10x the others, the first and the
    last staying quiet (a server started beside a test suite saw exactly that)."""
    from adapters import quiet_check

    samples, calls = quiet_check.NUM_SAMPLES, []

    def spell_in_the_middle(threads):
        calls.append(threads)
        busy = len(calls) == 3
        return [1000e-6 if busy else 100e-6] * samples, [1800e-6 if busy else 180e-6] * samples

    monkeypatch.setattr(quiet_check, "time_reference", spell_in_the_middle)
    engine = make_engine(compile_decode="auto", cache_dir=tmp_path)
    path = compiled_path(tmp_path, _identity(engine.lora_model.model))
    assert len(calls) > 3, "the spell fell on the last bracket: the test shows nothing new"
    assert not path.exists()

    monkeypatch.setattr(quiet_check, "time_reference", lambda threads: ([100e-6] * samples, [180e-6] * samples))
    make_engine(compile_decode="auto", cache_dir=tmp_path)
    conditions = json.loads(path.read_text())["verdict"]["conditions"]
    assert conditions["quiet"] and conditions["brackets_us"] == [[100.0, 180.0]] * len(calls)


def test_a_verdict_measured_under_load_is_measured_again_once_the_engine_idles(tmp_path, monkeypatch):
    """A server first started under load kept that start's verdict for its whole life (one stream
    22.1 against 37.7 tok/s for a quiet start's on the Intel Xeon: the noisy measurement chose
    eager). The verdict stays provisional and uncached, and the async engine's idle loop measures
    again: not while the reference is still slow, not past a round once work arrives, and once
    quiet, to the end: then it is cached and applied. Reference timings are set, as above."""
    from adapters import quiet_check
    from server.engine.async_engine import AsyncEngine

    samples, calls = quiet_check.NUM_SAMPLES, []
    busy = lambda threads: ([1000e-6] * samples, [1800e-6] * samples)  # noqa: E731
    quiet = lambda threads: ([100e-6] * samples, [180e-6] * samples)  # noqa: E731

    def busy_on_the_third(threads):
        calls.append(threads)
        return (busy if len(calls) == 3 else quiet)(threads)

    monkeypatch.setattr(quiet_check, "time_reference", busy_on_the_third)
    llm = make_engine(compile_decode="auto", cache_dir=tmp_path)
    compiled, path = llm.runner.compiled, compiled_path(tmp_path, _identity(llm.lora_model.model))
    assert compiled is not None and compiled.provisional is not None and not path.exists()

    monkeypatch.setattr(quiet_check, "time_reference", busy)
    llm.idle(interrupted=lambda: False)  # busy again: 10x the start's best reference, nothing measured
    assert compiled.provisional is not None and not path.exists()
    monkeypatch.setattr(quiet_check, "time_reference", quiet)
    llm.idle(interrupted=lambda: False)  # too soon after the last try
    assert compiled.provisional is not None and not path.exists()
    compiled.provisional.next_try = 0.0
    llm.idle(interrupted=lambda: True)  # a request came in: abandoned after one round
    assert compiled.provisional is not None and not path.exists()

    compiled.provisional.next_try = 0.0
    engine = AsyncEngine(llm)  # idle from the start: its loop measures after a second
    try:
        deadline = time.monotonic() + 120
        while compiled.provisional is not None and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        engine.stop(30)
    verdict = json.loads(path.read_text())["verdict"]
    assert verdict["conditions"]["quiet"] and compiled.max_rows == verdict["max_rows"]


def test_a_failed_compile_leaves_auto_eager_and_stops_on(adapter_paths, tmp_path, monkeypatch):
    """Inductor writes C++ and needs a compiler (a slim image may have none): with none, `auto` starts
    eager and still serves PEFT's tokens, `on` refuses to start, naming the flag. The compiler is a
    path that does not exist, and no code compiled before in this process can stand in for it."""
    import torch._inductor.codecache as codecache
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(codecache.CppCodeCache, "cache", {})
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": (str(tmp_path / "no-such-g++"),)}):
        engine = make_engine(adapter_paths, compile_decode="auto", cache_dir=tmp_path)
        assert engine.runner.compiled is None
        with pytest.raises(RuntimeError, match="--compile-decode on"):
            make_engine(adapter_paths, compile_decode="on", cache_dir=tmp_path / "on")
    (out,) = engine.generate([PROMPTS[0]], greedy(6), [None])
    assert out.token_ids == hf_greedy(peft_reference(adapter_paths), encode(PROMPTS[0]), 6, None)


def test_a_bf16_models_head_runs_our_dense_row_kernel_in_the_graph(tmp_path):
    """A bf16 model's head graph calls our dense row kernel (built here): the compiled engine's
    tokens score within bf16's effect under the eager engine (prompt logprobs over the same
    tokens: greedy tokens of a tiny random model in bf16 part ways within a few steps, as the graph
    rounds between fewer ops than eager does; measured |Δ logprob| ≤ 0.06 on this model)."""
    prompt = encode(PROMPTS[0])
    compiled, eager = (
        LLMEngine(
            BaseModel(fresh_model().to(torch.bfloat16), load_tokenizer(), "tiny", Path("tiny")),
            EngineConfig(compile_decode=mode, cache_dir=tmp_path),
        )
        for mode in ("on", "off")
    )
    graph = compiled.runner.compiled
    assert graph is not None and graph.matmuls() == {"head": DENSE_ROWS}
    before = graph.num_steps
    with torch.profiler.profile() as profile:
        (ours,) = compiled.generate([prompt], greedy(12, logprobs=0), [None])
    assert graph.num_steps - before >= 10, "the decode steps did not run compiled"
    calls = sum(e.count for e in profile.key_averages() if e.key == "loraserve_native::dense_rows")
    assert calls == graph.num_steps - before  # one call a step: the head's
    (scored,) = eager.generate([prompt + ours.token_ids], greedy(1, prompt_logprobs=0), [None])
    theirs = [t.logprob for t in scored.prompt_logprobs[len(prompt) :]]
    worst = max(abs(a.logprob - b) for a, b in zip(ours.logprobs, theirs))
    assert len(theirs) == len(ours.logprobs) and worst <= 0.15
