"""One pass over a wrapped model that decides how each base weight is stored and multiplied:
packed or plain per weight shape (a plan measured by kernel_choice.py, or one kernel for all), and
int8 with `quantization="int8"`.

Under int8, every nn.Linear whose inner dimension the kernel supports is quantized, except the
output head unless QUANTIZE_HEAD. The head's W0 stays resident anyway (the embedding lookup shares
it when tied, and saved copies are compared with it), so an int8 copy of it only replaces its
packed copy. Measured (benchmarks/results/base_precision.json): with fp32 activations that copy
makes decoding faster, but the head's error reaches the logits undamped and the teacher-forced
logprob error grew by about a fifth; with bf16 activations it gained no speed. So the head stays
in the model's dtype.
GPT-2's Conv1D layers stay in full precision (the int8 kernel takes [out, in] weights; GPT-2 is a
test architecture here, not a serving target).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .int8 import KERNEL_DTYPE, QuantizationError, can_quantize, check_int8_kernel
from .kernels import DEQUANTIZED, INT8, PACKED, PLAIN, KernelRule
from .layer import LoraLinear

DENSE_WEIGHT, INT8_WEIGHT = "dense", "int8"
WeightKey = tuple[str, int, int]  # (DENSE_WEIGHT or INT8_WEIGHT, out_features, in_features)
KernelPlan = Mapping[WeightKey, KernelRule]
QUANTIZATIONS = ("none", "int8")
QUANTIZE_HEAD = False


def is_quantized(module: nn.Module, is_head: bool, quantization: str | None) -> bool:
    """Whether `module` (an nn.Linear or a LoraLinear) runs on int8 under `quantization`."""
    if quantization != "int8" or (is_head and not QUANTIZE_HEAD):
        return False
    return isinstance(module, (nn.Linear, LoraLinear)) and not getattr(module, "is_conv1d", False) \
        and can_quantize(module.in_features)


def weight_keys(model: nn.Module, quantization: str | None = None) -> list[WeightKey]:
    """The distinct weights of an unwrapped model's linears a plan needs rules for, by shape:
    every full-precision weight (W0s, and the merged weights even of int8 layers) and int8 W0s."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    keys = set()
    for module in model.modules():
        if type(module) is nn.Linear:  # Conv1D runs its own kernel, not planned
            keys.add((DENSE_WEIGHT, module.out_features, module.in_features))
            if is_quantized(module, module is head, quantization):
                keys.add((INT8_WEIGHT, module.out_features, module.in_features))
    return sorted(keys)


def apply_base_kernels(layers: Iterable[LoraLinear], *, pack_weights: bool, quantization: str | None = None,
                       plan: KernelPlan | None = None) -> None:
    """Give each layer its kernels: `plan`'s rule for its shape, else one kernel for all row counts
    (packed if `pack_weights`, the int8 kernel for int8 weights); quantize first where asked."""
    if quantization not in (None, *QUANTIZATIONS):
        raise QuantizationError(f"quantization must be one of {', '.join(QUANTIZATIONS)}, not {quantization!r}")
    plan, layers = plan or {}, list(layers)
    dense_default = KernelRule.single(PACKED if pack_weights else PLAIN)
    scratch: dict[tuple[int, int], torch.Tensor] = {}  # dequantized W0, shared by the layers of one shape
    quantized = {layer for layer in layers if is_quantized(layer, layer.is_head, quantization)}
    if quantized:
        check_int8_kernel(next(iter(quantized)).device)
    for layer in layers:
        shape = (layer.out_features, layer.in_features)
        layer.use_kernels(plan.get((DENSE_WEIGHT, *shape), dense_default))
        if layer not in quantized:
            continue
        rule = plan.get((INT8_WEIGHT, *shape), KernelRule.single(INT8))
        if DEQUANTIZED in rule.kernels and shape not in scratch:
            scratch[shape] = torch.empty(shape, dtype=KERNEL_DTYPE, device=layer.device)
        layer.quantize_int8(rule, scratch.get(shape), keep_weight=layer.is_head)


def describe(plan: KernelPlan) -> str:
    """One line per weight shape, for the startup log."""
    return "; ".join(f"{kind} [{out}x{inp}]: {rule}" for (kind, out, inp), rule in sorted(plan.items()))
