"""Weight-only int8 bases, against fp32 PEFT on a copy of the model whose linears hold their
dequantized int8 values (the "int8 reference").

Merged, an int8 layer serves dequantized W0 + delta in the model's dtype: equal to the reference
up to fp32 rounding where an adapter targets every quantized layer. Otherwise (gathered, or layers
an adapter does not target), W0's product runs on bf16 activations (the int8 kernel's input and
output type); the tolerance is that rounding's own effect, measured on the reference by rounding
what each quantized linear reads and writes to bf16 (`bf16_linears`): the engine's error may be
another realization of the same roundings, so at most twice it.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

from adapters import native, wrap_model
from adapters.backends.cpu import CPU, DequantizedLinear, Int8Linear, Int8RowsLinear, check_int8_kernel
from adapters.kernel_plan import weight_keys
from adapters.kernels import (
    DEQUANTIZED,
    INT8,
    INT8_ROWS,
    PACKED,
    PLAIN,
    Int8Weight,
    KernelPlan,
    KernelRule,
    QuantizationError,
)
from support import quantized
from support.engine import PROMPTS, encode, fresh_model, greedy, hf_greedy, make_engine
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

try:
    check_int8_kernel(torch.device("cpu"))
    HAS_INT8 = True
except QuantizationError:
    HAS_INT8 = False
pytestmark = pytest.mark.skipif(not HAS_INT8, reason="this torch build has no CPU int8 weight-only kernel")

VARIANTS = {  # PEFT LoraConfig kwargs, all with non-zero B
    "lora": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    "bias": dict(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"], lora_bias=True),
    "copy": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["down_proj"]),
}


def quantized_names(model: nn.Module) -> set[str]:
    return set(quantized_kinds(model, "int8"))


def dequantized_copy(model: nn.Module) -> nn.Module:
    """`model` with every linear the engine quantizes holding its dequantized int8 values."""
    return quantized.dequantized_copy(model, "int8")


def int8_reference(base: nn.Module, paths: dict) -> peft.PeftModel:
    return dequantized_reference(base, "int8", paths)


def bf16_linears(reference: peft.PeftModel, names: set[str]):
    """Inside: each quantized base linear of `reference` reads and writes bf16-rounded values."""
    return hooked_linears(reference, names, lambda name: (_bf16_input, _bf16_output))


def _bf16_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].bfloat16().float(),)


def _bf16_output(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
    return out.bfloat16().float()


def assert_within_bf16_effect(got: torch.Tensor, reference: torch.Tensor, rounded: torch.Tensor) -> None:
    assert_within_effect(got, reference, rounded, times=2)


def wrapped_int8(base, paths: dict, **kwargs):
    return wrapped_with_adapters(base, paths, quantization="int8", **kwargs)


@pytest.fixture(scope="module")
def variant_paths(tiny_llama, tmp_path_factory, make_peft_adapter):
    root = tmp_path_factory.mktemp("int8-adapters")
    return {name: make_peft_adapter(tiny_llama, root / name, **kwargs) for name, kwargs in VARIANTS.items()}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("kernel", [PLAIN, PACKED])
@torch.no_grad()
def test_gathered_and_merged_match_peft_on_the_dequantized_model(tiny_llama, token_ids, variant_paths, variant, kernel):
    paths = {variant: variant_paths[variant]}
    lora_model, slots = wrapped_int8(tiny_llama, paths, kernels=KernelPlan(kernel))
    reference = int8_reference(tiny_llama, paths)
    expected = reference(token_ids).logits
    with bf16_linears(reference, quantized_names(tiny_llama)):
        rounded = reference(token_ids).logits
    assert (
        expected - peft.PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(paths[variant]))(token_ids).logits
    ).abs().max() > 0, "the int8 reference must differ from the fp32 model"

    batch = lora_model.build_batch(torch.full((token_ids.numel(),), slots[variant]))
    with lora_model.gather(batch):
        assert_within_bf16_effect(lora_model.model(token_ids).logits, expected, rounded)
    lora_model.merge(slots[variant])
    merged = lora_model.model(token_ids).logits
    if all(lora_model.layers[name].slot_ranks[slots[variant]] for name in quantized_names(tiny_llama)):
        torch.testing.assert_close(merged, expected)  # every int8 layer merged: dequantized W0 + delta in fp32
    else:
        assert_within_bf16_effect(merged, expected, rounded)  # the layers it does not target stay int8


@torch.no_grad()
def test_mixed_batch_rows_each_match_their_own_adapter(tiny_llama, token_ids, variant_paths):
    paths = {name: variant_paths[name] for name in ("lora", "bias")}
    lora_model, slots = wrapped_int8(tiny_llama, paths, kernels=KernelPlan(PACKED))
    reference, names = int8_reference(tiny_llama, paths), quantized_names(tiny_llama)
    assert_mixed_rows_match(lora_model, slots, reference, token_ids, lambda: bf16_linears(reference, names), times=2)


@torch.no_grad()
def test_quantized_layers_keep_no_full_precision_w0_and_unmerge_frees_the_merged_copy(
    tiny_llama, token_ids, variant_paths
):
    lora_model, slots = wrapped_int8(tiny_llama, {"lora": variant_paths["lora"]})
    names = quantized_names(tiny_llama)
    assert names and all(name in lora_model.layers for name in names)
    for name, layer in lora_model.layers.items():
        if name in names:
            assert layer.quantized is not None and not hasattr(layer, "weight")
            assert torch.equal(
                layer.base_weight(),
                Int8Weight.quantize(tiny_llama.get_submodule(name).weight).dequantize(torch.float32),
            )
    head = lora_model.model.lm_head
    assert head.quantized is None and torch.equal(head.weight, tiny_llama.lm_head.weight)  # full precision
    base = lora_model.model(token_ids).logits
    q_proj = lora_model.layers["model.layers.0.self_attn.q_proj"]
    lora_model.merge(slots["lora"])
    assert q_proj.merged_weight is not None
    lora_model.unmerge()
    assert q_proj.merged_weight is None and q_proj.merged_kernel is None
    assert torch.equal(lora_model.model(token_ids).logits, base)


def test_gpt2_conv1d_layers_stay_in_full_precision(tiny_gpt2):
    lora_model = wrap_model(copy.deepcopy(tiny_gpt2), quantization="int8")
    assert all(layer.quantized is None for layer in lora_model.layers.values())


@pytest.mark.parametrize("kernel", [INT8, INT8_ROWS, DEQUANTIZED])
@pytest.mark.parametrize("rows", [1, 16, 64])
def test_int8_kernels_are_as_exact_as_bf16_allows(kernel, rows, request):
    """All take bf16 activations and give a bf16 product (the dequantized one also rounds W0 to
    bf16), accumulating in fp32: within half a bf16 ulp per rounding, plus fp32 accumulation."""
    in_features = 576
    weight = Int8Weight.quantize(torch.randn(960, in_features) * 0.02)
    x = torch.randn(rows, in_features)
    if kernel == INT8:
        linear = Int8Linear(weight, None, torch.float32)
    elif kernel == INT8_ROWS:
        linear = Int8RowsLinear(weight, None, request.getfixturevalue("int8_rows"))
    else:
        linear = DequantizedLinear(weight, None, torch.float32, torch.empty(960, in_features, dtype=torch.bfloat16))
    x_bf16, w = x.bfloat16().double(), weight.dequantize(torch.float64)
    exact, magnitude = x_bf16 @ w.T, x_bf16.abs() @ w.abs().T
    half_ulp, fp32 = torch.finfo(torch.bfloat16).eps / 2, torch.finfo(torch.float32).eps
    roundings = 1 if kernel == INT8 else 2  # + the weight's
    bound = half_ulp * exact.abs() + (roundings * half_ulp + in_features * fp32) * magnitude
    assert ((linear(x).double() - exact).abs() <= bound).all()


def test_engine_int8_tokens_and_logprobs_match_the_int8_reference(adapter_paths):
    requests = [(PROMPTS[0], None), (PROMPTS[0], "a"), (PROMPTS[1], "b"), (PROMPTS[2], "a")]
    engine = make_engine(adapter_paths, quantization="int8")
    completions = engine.generate([p for p, _ in requests], greedy(8, logprobs=0), [a for _, a in requests])
    reference, names = int8_reference(fresh_model(), adapter_paths), quantized_names(fresh_model())
    for (prompt, adapter), completion in zip(requests, completions):
        with bf16_linears(reference, names):
            assert completion.token_ids == hf_greedy(reference, encode(prompt), 8, adapter), (prompt, adapter)
        ids = torch.tensor([encode(prompt) + completion.token_ids[:-1]])
        kwargs = {"adapter_names": [adapter or "__base__"]}
        with torch.no_grad():
            expected = token_logprobs(reference(ids, **kwargs).logits, completion.token_ids)
            with bf16_linears(reference, names):
                rounded = token_logprobs(reference(ids, **kwargs).logits, completion.token_ids)
        got = torch.tensor([logprob.logprob for logprob in completion.logprobs])
        assert_within_bf16_effect(got, expected, rounded)


def test_engine_gather_and_merged_agree_under_int8(adapter_paths):
    prompts = [PROMPTS[1], PROMPTS[3]]
    merged = make_engine(adapter_paths, quantization="int8", merge_after_steps=1)
    gathered = make_engine(adapter_paths, quantization="int8", merge_after_steps=10_000)
    tokens = [[c.token_ids for c in engine.generate(prompts, greedy(8), ["a", "a"])] for engine in (merged, gathered)]
    assert merged.stats().steps_by_mode["merged"] > 0 and gathered.stats().steps_by_mode["merged"] == 0
    assert tokens[0] == tokens[1]
    reference = int8_reference(fresh_model(), adapter_paths)
    assert tokens[0] == [hf_greedy(reference, encode(prompt), 8, "a") for prompt in prompts]


def test_a_device_without_the_int8_kernel_is_refused(tiny_llama):
    with pytest.raises(QuantizationError, match="no int8 weight-only kernel on device 'meta'"):
        wrap_model(copy.deepcopy(tiny_llama).to("meta"), quantization="int8")


def test_unknown_quantization_is_refused(tiny_llama):
    with pytest.raises(QuantizationError, match="quantization must be one of none, int8, q4_1"):
        wrap_model(copy.deepcopy(tiny_llama), quantization="int4")


@torch.no_grad()
def test_a_rule_can_switch_int8_kernels_by_row_count(tiny_llama, token_ids):
    """Calls of 4 rows or more (the prefill here) on the dequantized path, fewer on the int8 kernel."""
    plan = {key: KernelRule(INT8, DEQUANTIZED, 4) for key in weight_keys(tiny_llama, "int8") if key[0] == "int8"}
    switched = wrap_model(copy.deepcopy(tiny_llama), quantization="int8", kernels=KernelPlan(rules=plan))
    q_proj = switched.layers["model.layers.0.self_attn.q_proj"]
    assert isinstance(q_proj.kernel.large, DequantizedLinear) and isinstance(q_proj.kernel.small, Int8Linear)
    reference, names = dequantized_copy(tiny_llama), quantized_names(tiny_llama)
    for ids in (token_ids[:1, :1], token_ids):  # 1 row: the int8 kernel; 24 rows: dequantized
        expected = reference(ids).logits
        with bf16_linears(reference, names):
            rounded = reference(ids).logits
        assert_within_bf16_effect(switched.model(ids).logits, expected, rounded)


@pytest.fixture(scope="module")
def int8_rows(tmp_path_factory):
    """Our int8 row kernel, built here (g++, as inductor needs) or loaded from this process's build."""
    assert native.load_row_kernels(tmp_path_factory.mktemp("native-cache")), "the int8 row kernel did not build"
    assert INT8_ROWS in CPU.int8_kernels  # a candidate the plan measures from now on
    return native.int8_rows_op()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [576, 72])  # 72: a tail past the vector loop's blocks of 64 or 32
@pytest.mark.parametrize("rows", [1, 3])
def test_our_int8_row_kernel_keeps_the_int8_contract_with_a_bias_and_any_shape(int8_rows, dtype, in_features, rows):
    """bf16-rounded activations, fp32 sums, the product rounded to bf16, then the bias; leading
    dimensions kept, the result in the activations' dtype."""
    weight = Int8Weight.quantize(torch.randn(200, in_features) * 0.02)
    bias = torch.randn(200).to(dtype)
    x = torch.randn(2, rows, in_features).to(dtype)
    got = Int8RowsLinear(weight, bias, int8_rows)(x)
    assert got.dtype == dtype and got.shape == (2, rows, 200)
    x_bf16, w = x.bfloat16().double(), weight.dequantize(torch.float64)
    product, magnitude = x_bf16 @ w.T, x_bf16.abs() @ w.abs().T
    exact = product + bias.double()
    half_ulp, fp32 = torch.finfo(torch.bfloat16).eps / 2, torch.finfo(torch.float32).eps
    out_rounding = fp32 if dtype == torch.float32 else half_ulp
    bound = half_ulp * product.abs() + in_features * fp32 * magnitude + out_rounding * (exact.abs() + 1e-30)
    assert ((got.double() - exact).abs() <= 2 * bound).all()


@torch.no_grad()
def test_a_model_on_our_int8_row_kernel_is_within_the_bf16_effect_of_the_int8_reference(
    int8_rows, tiny_llama, token_ids
):
    """One row and 24 rows alike, as aten's int8 kernel is (test_a_rule_can_switch_int8_kernels_by_row_count)."""
    plan = {key: KernelRule.single(INT8_ROWS) for key in weight_keys(tiny_llama, "int8") if key[0] == "int8"}
    lora_model = wrap_model(copy.deepcopy(tiny_llama), quantization="int8", kernels=KernelPlan(rules=plan))
    assert isinstance(lora_model.layers["model.layers.0.mlp.down_proj"].kernel, Int8RowsLinear)
    reference, names = dequantized_copy(tiny_llama), quantized_names(tiny_llama)
    for ids in (token_ids[:1, :1], token_ids):
        expected = reference(ids).logits
        with bf16_linears(reference, names):
            rounded = reference(ids).logits
        assert_within_bf16_effect(lora_model.model(ids).logits, expected, rounded)


def test_a_machine_that_cannot_build_the_int8_row_kernel_keeps_atens(tmp_path):
    """A compiler that fails (here `false`): the load says why and returns False, and the CPU
    backend offers only aten's int8 kernels."""
    script = (
        "import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.WARNING)\n"
        "from adapters import native; from adapters.backends.cpu import CPU\n"
        "print(native.load_row_kernels(Path(sys.argv[1])), CPU.int8_kernels)"
    )
    done = run_without_a_compiler(script, tmp_path)
    assert done.stdout.strip() == "False ('int8', 'dequantized')", done.stderr
    assert "no row kernels of ours: building them failed" in done.stderr
    assert not list((tmp_path / "native").glob("*.so"))  # nothing half-written is left to load


@pytest.fixture(scope="module")
def compiled_int8(int8_rows, tiny_adapter_paths, tmp_path_factory):
    """(compiled, eager) int8 engines; a lone adapter request merges after one step."""
    cache_dir = tmp_path_factory.mktemp("compiled-int8")
    config = dict(quantization="int8", merge_after_steps=1)
    compiled = make_engine(tiny_adapter_paths, compile_decode="on", cache_dir=cache_dir, **config)
    assert compiled.runner.compiled is not None and compiled.runner.compiled.matmuls()["int8"] == INT8_ROWS
    return compiled, make_engine(tiny_adapter_paths, **config)


def test_the_compiled_step_on_an_int8_base_runs_our_kernel_within_the_int8_reference(compiled_int8, adapter_paths):
    """One stream's decode steps run the graph, its int8 matmuls on our kernel (fp32 activations),
    q/k/v and gate/up each in one call: where the eager engine's run aten's on bf16 ones, the same
    tokens, and logprobs within the bf16 effect of the int8 reference (the prompt's step runs
    eagerly, on bf16 activations)."""
    compiled, eager = compiled_int8
    before = compiled.runner.compiled.num_steps
    with torch.profiler.profile() as profile:
        (ours,) = compiled.generate([PROMPTS[0]], greedy(10, logprobs=0), [None])
    (theirs,) = eager.generate([PROMPTS[0]], greedy(10, logprobs=0), [None])
    steps = compiled.runner.compiled.num_steps - before
    assert steps >= 8, "the decode steps did not run compiled"
    calls = {e.key.removeprefix("loraserve_native::"): e.count for e in profile.key_averages()}
    layers = len(compiled.lora_model.model.model.layers)
    assert calls["int8_rows_group"] == 2 * layers * steps and calls["int8_rows"] == 2 * layers * steps  # o, down
    assert ours.token_ids == theirs.token_ids
    reference, names = int8_reference(fresh_model(), adapter_paths), quantized_names(fresh_model())
    ids = torch.tensor([encode(PROMPTS[0]) + ours.token_ids[:-1]])
    with torch.no_grad(), reference.disable_adapter():
        expected = token_logprobs(reference(ids).logits, ours.token_ids)
        with bf16_linears(reference, names):
            rounded = token_logprobs(reference(ids).logits, ours.token_ids)
    assert_within_bf16_effect(torch.tensor([t.logprob for t in ours.logprobs]), expected, rounded)


def test_one_stream_on_an_adapter_over_an_int8_base_stays_in_the_lora_graph(compiled_int8, adapter_paths):
    """Merging would make the adapter's layers full precision and eager (slower: docs/benchmarks.md),
    so a lone request gathers through the compiled LoRA graph however long it runs, within the bf16
    effect of the int8 reference; the eager engine merges it (its first tokens are the same)."""
    compiled, eager = compiled_int8
    lora_steps = compiled.runner.compiled.num_lora_steps
    merged_before = compiled.stats().steps_by_mode.get("merged", 0)
    (ours,) = compiled.generate([PROMPTS[1]], greedy(40, logprobs=0), ["a"])
    (theirs,) = eager.generate([PROMPTS[1]], greedy(40), ["a"])
    assert compiled.runner.compiled.num_lora_steps - lora_steps >= 38
    assert compiled.stats().steps_by_mode.get("merged", 0) == merged_before
    assert eager.stats().steps_by_mode.get("merged"), "the eager engine did not merge"
    assert ours.token_ids[:8] == theirs.token_ids[:8]
    reference, names = int8_reference(fresh_model(), adapter_paths), quantized_names(fresh_model())
    reference.set_adapter("a")
    ids = torch.tensor([encode(PROMPTS[1]) + ours.token_ids[:-1]])
    with torch.no_grad():
        expected = token_logprobs(reference(ids).logits, ours.token_ids)
        with bf16_linears(reference, names):
            rounded = token_logprobs(reference(ids).logits, ours.token_ids)
    assert_within_bf16_effect(torch.tensor([t.logprob for t in ours.logprobs]), expected, rounded)


def test_an_adapter_merged_into_an_int8_base_decodes_eagerly_without_recompiling(compiled_int8):
    """Two rows on one adapter merge it (no graph serves two rows); when one finishes, the other's
    one-row steps stay merged, and merged int8 layers are full precision, not the graph's inputs:
    those steps run eagerly, and the base's steps run the graph again after."""
    import torch._dynamo.utils

    compiled, eager = compiled_int8
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    before = compiled.runner.compiled.num_steps
    params = [greedy(3), greedy(10)]
    ours = compiled.generate([PROMPTS[1], PROMPTS[2]], params, ["a", "a"])
    theirs = eager.generate([PROMPTS[1], PROMPTS[2]], params, ["a", "a"])
    assert compiled.stats().steps_by_mode.get("merged")
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    assert compiled.runner.compiled.num_steps == before, "a step on merged int8 layers ran the graph"
    compiled.generate([PROMPTS[2]], greedy(6), [None])  # unmerged again: the graph serves the base
    assert compiled.runner.compiled.num_steps - before >= 5
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a decode step recompiled"


@pytest.mark.real_model
def test_an_int8_server_answers_as_the_int8_engine_alone():
    from server.engine.llm_engine import EngineConfig, LLMEngine
    from server.engine.model_loader import load_base_model
    from server.engine.sampling_params import SamplingParams
    from server.http.settings import Settings
    from support.http import BASE, openai_client, serve

    prompt = "The capital of France is"
    with serve(Settings(quantization="int8")) as served, openai_client(served) as client:
        completion = client.completions.create(model=BASE, prompt=prompt, max_tokens=8, temperature=0)
        assert all(
            layer.quantized is not None
            for name, layer in served.engine.lora_model.layers.items()
            if name.endswith("q_proj")
        )
    alone = LLMEngine(load_base_model(), EngineConfig(quantization="int8", kernel_choice="auto"))
    assert completion.choices[0].text == alone.generate([prompt], SamplingParams(temperature=0, max_tokens=8))[0].text


@pytest.mark.real_model
def test_a_server_asked_for_int8_where_the_kernel_is_missing_exits_with_the_reason(tmp_path):
    from support.servers import start_process

    server = start_process(tmp_path, "--quantization", "int8", "--device", "meta")  # no data: no kernel runs
    try:
        code = server.process.wait(timeout=180)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)
    log = server.log_tail()
    assert code == 1, log
    assert "startup failed" in log and "no int8 weight-only kernel on device 'meta'" in log
