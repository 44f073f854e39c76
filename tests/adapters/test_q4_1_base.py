"""q4_1 bases (Q4_1 linears and a Q8_0 head, adapters/blocks.py) against fp32 PEFT on a copy of the
model whose linears hold their dequantized block values (the "q4_1 reference").

Our block kernel reads each linear's input quantized per group of 32 to int16 (block_kernels.cpp);
the tolerance is that rounding's own effect on the reference (`int16_inputs`: the reference computing
as the kernel does), at most three times it: the engine's error is another realization of the same
roundings (fp32 noise upstream moves which way a value rounds), measured at up to 1.7x the effect
(tiny Llama, DoRA merged, Intel Xeon). The dequantized matmul
(many rows) and merged layers compute with the block values in the model's dtype: fp32 rounding only.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import peft
import pytest
import torch
from torch import nn

from adapters import native, wrap_model
from adapters.blocks import GROUP, Q4_1, Q8_0, BlockWeight
from adapters.kernel_plan import weight_keys
from adapters.kernels import BLOCK_ROWS, DEQUANTIZED, KernelPlan, KernelRule, QuantizationError
from support import quantized
from support.engine import PROMPTS, encode, fresh_model, greedy, make_engine
from support.quantized import (
    assert_mixed_rows_match,
    assert_within_effect,
    dequantized_reference,
    hooked_linears,
    quantized_kinds,
    run_without_a_compiler,
    token_logprobs,
    wrapped_with_adapters,
)

VARIANTS = {  # PEFT LoraConfig kwargs, all with non-zero B
    "lora": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "bias": dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], lora_bias=True),
}


@pytest.fixture(scope="module", autouse=True)
def built(tmp_path_factory):
    assert native.load_row_kernels(tmp_path_factory.mktemp("native-cache")), "our kernels did not build"


def block_kinds(model: nn.Module) -> dict[str, str]:
    return quantized_kinds(model, "q4_1")


def dequantized_copy(model: nn.Module) -> nn.Module:
    """`model` with every linear the engine quantizes holding its dequantized block values."""
    return quantized.dequantized_copy(model, "q4_1")


def q4_1_reference(base: nn.Module, paths: dict) -> peft.PeftModel:
    return dequantized_reference(base, "q4_1", paths)


def _as_our_kernel(kind: str, module: nn.Linear, args: tuple, out: torch.Tensor) -> torch.Tensor:
    """The linear's output as our block kernel computes it: its input rounded per group of 32 to
    the int16 grid of the group's largest magnitude, times d·q, plus (Q4_1: w = d·q + m) each
    group's minimum, its smallest value, times the unrounded input's sum."""
    x, weight = args[0], module.weight
    groups = x.unflatten(-1, (-1, GROUP))
    step = groups.abs().amax(-1, keepdim=True) / 32767
    rounded = (torch.round(groups / step.clamp_min(1e-30)) * step).flatten(-2)
    minimums = torch.zeros_like(weight)
    if kind == Q4_1:
        minimums = weight.unflatten(-1, (-1, GROUP)).amin(-1, keepdim=True).expand(-1, -1, GROUP).flatten(-2)
    y = nn.functional.linear(rounded, weight - minimums) + nn.functional.linear(x, minimums)
    return y if module.bias is None else y + module.bias


def int16_inputs(reference: nn.Module, kinds: dict[str, str]):
    """Inside: each quantized base linear of `reference` (`kinds`: block kinds by name) computes as
    our block kernel does."""
    return hooked_linears(reference, kinds, lambda name: (None, functools.partial(_as_our_kernel, kinds[name])))


def assert_within_int16_effect(got: torch.Tensor, reference: torch.Tensor, rounded: torch.Tensor) -> None:
    assert_within_effect(got, reference, rounded, times=3)


def wrapped_q4_1(base: nn.Module, paths: dict, kernel: str) -> tuple:
    rules = {key: KernelRule.single(kernel) for key in weight_keys(base, "q4_1") if key[0] in (Q4_1, Q8_0)}
    return wrapped_with_adapters(base, paths, quantization="q4_1", kernels=KernelPlan(rules=rules))


@pytest.fixture(scope="module")
def variant_paths(tiny_llama, tmp_path_factory, make_peft_adapter):
    root = tmp_path_factory.mktemp("q4_1-adapters")
    return {name: make_peft_adapter(tiny_llama, root / name, **kwargs) for name, kwargs in VARIANTS.items()}


def test_linears_hold_blocks_and_drop_their_full_precision_w0(tiny_llama):
    lora_model = wrap_model(copy.deepcopy(tiny_llama), quantization="q4_1")
    kinds = block_kinds(tiny_llama)
    assert kinds["lm_head"] == Q8_0 and set(kinds.values()) == {Q4_1, Q8_0}
    for name, kind in kinds.items():
        layer = lora_model.layers[name]
        assert layer.quantized.kind == kind and hasattr(layer, "weight") == (name == "lm_head")  # the head: tied
        expected = BlockWeight.quantize(tiny_llama.get_submodule(name).weight, kind).dequantize(torch.float32)
        assert torch.equal(layer.base_weight(), expected)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kernel", [BLOCK_ROWS, DEQUANTIZED])
@torch.no_grad()
def test_gathered_and_merged_match_peft_on_the_dequantized_model(tiny_llama, token_ids, variant_paths, variant, kernel):
    paths = {variant: variant_paths[variant]}
    lora_model, slots = wrapped_q4_1(tiny_llama, paths, kernel)
    reference = q4_1_reference(tiny_llama, paths)
    expected = reference(token_ids).logits
    with int16_inputs(reference, block_kinds(tiny_llama)):
        rounded = reference(token_ids).logits
    batch = lora_model.build_batch(torch.full((token_ids.numel(),), slots[variant]))
    for run in ("gathered", "merged"):
        if run == "merged":
            lora_model.merge(slots[variant])
        with lora_model.gather(batch) if run == "gathered" else contextlib.nullcontext():
            got = lora_model.model(token_ids).logits
        if kernel == DEQUANTIZED:
            torch.testing.assert_close(got, expected)  # the block values in fp32
        else:
            assert_within_int16_effect(got, expected, rounded)


@torch.no_grad()
def test_mixed_batch_rows_each_match_their_own_adapter(tiny_llama, token_ids, variant_paths):
    paths = {name: variant_paths[name] for name in ("lora", "bias")}
    lora_model, slots = wrapped_q4_1(tiny_llama, paths, BLOCK_ROWS)
    reference, names = q4_1_reference(tiny_llama, paths), block_kinds(tiny_llama)
    assert_mixed_rows_match(lora_model, slots, reference, token_ids, lambda: int16_inputs(reference, names), times=3)


@pytest.fixture(scope="module")
def compiled_q4_1(tiny_adapter_paths, tmp_path_factory):
    """(compiled, eager) q4_1 engines; a lone adapter request merges after one step (eagerly)."""
    cache_dir = tmp_path_factory.mktemp("compiled-q4_1")
    compiled = make_engine(
        tiny_adapter_paths, compile_decode="on", cache_dir=cache_dir, quantization="q4_1", merge_after_steps=1
    )
    assert compiled.runner.compiled.matmuls() == {"q4_1": "q4_1-rows", "head": "q8_0-rows"}
    return compiled, make_engine(tiny_adapter_paths, cache_dir=cache_dir, quantization="q4_1", merge_after_steps=1)


def test_the_compiled_step_on_a_q4_1_base_runs_our_kernels_within_the_reference(compiled_q4_1, adapter_paths):
    """One stream's decode steps run the graph: four block-kernel calls a layer (q/k/v and gate/up
    grouped, o, down) and one for the head; the eager engine's tokens, and logprobs within the
    int16 effect of the q4_1 reference."""
    compiled, eager = compiled_q4_1
    before = compiled.runner.compiled.num_steps
    with torch.profiler.profile() as profile:
        (ours,) = compiled.generate([PROMPTS[0]], greedy(10, logprobs=0), [None])
    (theirs,) = eager.generate([PROMPTS[0]], greedy(10, logprobs=0), [None])
    steps = compiled.runner.compiled.num_steps - before
    assert steps >= 8, "the decode steps did not run compiled"
    calls = {e.key.removeprefix("loraserve_native::"): e.count for e in profile.key_averages()}
    layers = len(compiled.lora_model.model.model.layers)
    assert calls["q4_1_rows"] >= 4 * layers * steps and calls["q8_0_rows"] >= steps  # + the prompt's, eagerly
    assert ours.token_ids == theirs.token_ids
    model = fresh_model()
    reference, names = dequantized_copy(model), block_kinds(model)
    ids = torch.tensor([encode(PROMPTS[0]) + ours.token_ids[:-1]])
    with torch.no_grad():
        expected = token_logprobs(reference(ids).logits, ours.token_ids)
        with int16_inputs(reference, names):
            rounded = token_logprobs(reference(ids).logits, ours.token_ids)
    assert_within_int16_effect(torch.tensor([t.logprob for t in ours.logprobs]), expected, rounded)


def test_one_stream_on_an_adapter_over_a_q4_1_base_stays_in_the_lora_graph(compiled_q4_1, adapter_paths):
    """Merging would make the adapter's layers full precision and eager, so a lone request gathers
    through the compiled LoRA graph, within the int16 effect of the q4_1 reference."""
    compiled, _ = compiled_q4_1
    lora_steps = compiled.runner.compiled.num_lora_steps
    merged_before = compiled.stats().steps_by_mode.get("merged", 0)
    (ours,) = compiled.generate([PROMPTS[1]], greedy(12, logprobs=0), ["a"])
    assert compiled.runner.compiled.num_lora_steps - lora_steps >= 10
    assert compiled.stats().steps_by_mode.get("merged", 0) == merged_before
    reference = q4_1_reference(fresh_model(), adapter_paths)
    reference.set_adapter("a")
    ids = torch.tensor([encode(PROMPTS[1]) + ours.token_ids[:-1]])
    with torch.no_grad():
        expected = token_logprobs(reference(ids).logits, ours.token_ids)
        with int16_inputs(reference, block_kinds(fresh_model())):
            rounded = token_logprobs(reference(ids).logits, ours.token_ids)
    assert_within_int16_effect(torch.tensor([t.logprob for t in ours.logprobs]), expected, rounded)


def test_a_device_or_machine_without_our_kernels_is_refused(tiny_llama, tmp_path):
    with pytest.raises(QuantizationError, match="not built on device 'meta'"):
        wrap_model(copy.deepcopy(tiny_llama).to("meta"), quantization="q4_1")
    script = (  # a machine whose compiler fails (`false`): the build says why, q4_1 is refused
        "import logging, sys, torch; from pathlib import Path; logging.basicConfig(level=logging.WARNING)\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from adapters import kernel_plan, wrap_model\n"
        "model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128,"
        " num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))\n"
        "kernel_plan.load_native_kernels(torch.device('cpu'), 'q4_1', Path(sys.argv[1]))\n"
        "wrap_model(model, quantization='q4_1')\n"
    )
    done = run_without_a_compiler(script, tmp_path)
    assert done.returncode != 0 and "no row kernels of ours: building them failed" in done.stderr
    assert "QuantizationError: --quantization q4_1 runs on our block kernels, which are not built here" in done.stderr


@pytest.mark.real_model
def test_a_q4_1_server_answers_with_the_fp32_models_tokens_within_the_int16_effect(default_model):
    """The default model's GGUF is Q4_1 (and a Q8_0 head): packed again, the weights are the fp32
    model's own (test_blocks.py), so over HTTP a q4_1 server's greedy tokens and logprobs are the
    fp32 model's, within what rounding the linears' inputs to int16 does to the fp32 model."""
    from server.http.settings import Settings
    from support.http import BASE, openai_client, serve

    prompt, count = "The capital of France is", 8
    with serve(Settings(quantization="q4_1")) as served, openai_client(served) as client:
        completion = client.completions.create(
            model=BASE, prompt=prompt, max_tokens=count, temperature=0, logprobs=0, extra_body={"ignore_eos": True}
        )
        layers = served.engine.lora_model.layers
        assert all(layers[name].quantized.kind == Q4_1 for name in layers if name.endswith("q_proj"))
    tokenizer, model = default_model.tokenizer, default_model.model
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(count):  # the fp32 model's greedy continuation
            ids.append(model(torch.tensor([ids])).logits[0, -1].argmax().item())
        tokens, inputs = ids[-count:], torch.tensor([ids[:-1]])
        expected = token_logprobs(model(inputs).logits, tokens)
        with int16_inputs(model, block_kinds(model)):
            rounded = token_logprobs(model(inputs).logits, tokens)
    assert completion.choices[0].text == tokenizer.decode(tokens)
    got = torch.tensor(completion.choices[0].logprobs.token_logprobs)
    assert_within_int16_effect(got, expected, rounded)
