"""The quantized-base tests' references (test_quantization.py: int8; test_q4_1_base.py: q4_1): fp32
PEFT on a copy of the model whose linears hold their dequantized values, and hooks that make those
linears round as a kernel does, to measure the rounding's own effect as a tolerance."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import peft
import torch
from torch import nn

from adapters import AdapterRegistry, wrap_model
from adapters.blocks import BlockWeight
from adapters.kernel_plan import quantized_kind
from adapters.kernels import INT8_WEIGHT, Int8Weight

Hooks = Callable[[str], tuple[Callable | None, Callable | None]]  # a linear's name -> (pre-hook, hook)


def quantized_kinds(model: nn.Module, quantization: str) -> dict[str, str]:
    """Name -> kind of each linear `model` gets quantized under `quantization`."""
    head = model.get_output_embeddings()
    kinds = {
        name: quantized_kind(m, m is head, quantization) for name, m in model.named_modules() if type(m) is nn.Linear
    }
    return {name: kind for name, kind in kinds.items() if kind is not None}


def dequantized_copy(model: nn.Module, quantization: str) -> nn.Module:
    """`model` with every linear the engine quantizes holding its dequantized values."""
    model, kinds = copy.deepcopy(model), quantized_kinds(model, quantization)
    for name, module in model.named_modules():
        if name in kinds:
            weight = module.weight
            quantized = (
                Int8Weight.quantize(weight) if kinds[name] == INT8_WEIGHT else BlockWeight.quantize(weight, kinds[name])
            )
            weight.data = quantized.dequantize(weight.dtype)
    return model


def dequantized_reference(base: nn.Module, quantization: str, paths: dict) -> peft.PeftModel:
    """fp32 PEFT with the adapters at `paths` (name -> directory) on `dequantized_copy(base)`."""
    (first, first_path), *rest = paths.items()
    model = peft.PeftModel.from_pretrained(dequantized_copy(base, quantization), str(first_path), adapter_name=first)
    for name, path in rest:
        model.load_adapter(str(path), adapter_name=name)
    return model.eval()


@contextmanager
def hooked_linears(reference: nn.Module, names: set[str] | dict[str, str], hooks: Hooks) -> Iterator[None]:
    """Inside: each base linear of `reference` named in `names` runs `hooks(name)`'s (pre-hook, hook)."""
    handles = []
    for name, module in reference.named_modules():
        key = name.removeprefix("base_model.model.").removesuffix(".base_layer").removesuffix(".original_module")
        if type(module) is nn.Linear and key in names:
            pre, post = hooks(key)
            if pre is not None:
                handles.append(module.register_forward_pre_hook(pre))
            if post is not None:
                handles.append(module.register_forward_hook(post))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def assert_within_effect(got: torch.Tensor, reference: torch.Tensor, rounded: torch.Tensor, times: float) -> None:
    """|got - reference| at most `times` the rounding's own effect (|rounded - reference|), which must be > 0."""
    effect = (rounded - reference).abs().max()
    assert effect > 0, "no quantized linear was rounded: the tolerance would be zero"
    assert (got - reference).abs().max() <= times * effect


def token_logprobs(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logprob of each generated token at the position that predicted it."""
    logprobs = torch.log_softmax(logits[0].float(), -1)[-len(tokens) :]  # [T, V]
    return logprobs.gather(1, torch.tensor(tokens)[:, None])[:, 0]


@torch.no_grad()
def assert_mixed_rows_match(lora_model, slots: dict, reference: peft.PeftModel, token_ids, rounding, times: float):
    """One gathered batch whose rows (one sequence each) run "lora", the base, "bias" and "lora"
    (slots by name): each row within `times` the effect of `rounding` (a context on `reference`)."""
    row_adapters = ["lora", None, "bias", "lora"]
    token_slots = torch.tensor([slots[a] if a else -1 for a in row_adapters]).repeat_interleave(token_ids.shape[1])
    with lora_model.gather(lora_model.build_batch(token_slots)):
        got = lora_model.model(token_ids).logits
    for row, adapter in enumerate(row_adapters):
        ids, kwargs = token_ids[row : row + 1], {"adapter_names": [adapter or "__base__"]}
        expected = reference(ids, **kwargs).logits
        with rounding():
            rounded = reference(ids, **kwargs).logits
        assert_within_effect(got[row : row + 1], expected, rounded, times)


def wrapped_with_adapters(base: nn.Module, paths: dict, **wrap_kwargs) -> tuple:
    """(a LoraModel on a copy of `base`, 4 slots of rank 16, with the adapters at `paths` registered
    and acquired, {name: slot})."""
    lora_model = wrap_model(copy.deepcopy(base), max_loras=4, max_rank=16, **wrap_kwargs)
    registry = AdapterRegistry(lora_model)
    for name, path in paths.items():
        registry.add(name, path)
    return lora_model, {name: registry.acquire(name).slot for name in paths}


def run_without_a_compiler(script: str, cache_dir: Path) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter (argv[1]: `cache_dir`) whose C++ compiler fails (`false`),
    as on a machine where our row kernels cannot be built."""
    return subprocess.run(
        [sys.executable, "-c", script, str(cache_dir)],
        env={**os.environ, "CXX": "false"},
        capture_output=True,
        text=True,
        timeout=120,
    )
