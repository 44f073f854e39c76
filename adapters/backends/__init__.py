"""Kernels per device: a backend makes the callable for each kernel name (kernels.py) on its device.

The plan (kernel_plan.py) asks the backend of a weight's device which kernels it can choose
between, whether that choice is measured there and under which machine name a measured plan is
cached, and for the callables; fused linears (fused.py) ask it whether a rule gains from one call
for several weights. A new device adds a module here (a `cuda.py` with the methods of `Backend`
and, if its kernels are to be measured, a timer that synchronises) and one entry in BACKENDS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Protocol

import torch

from ..blocks import BlockWeight
from ..kernels import Int8Weight, Kernel, KernelRule, by_rule
from . import cpu


class Backend(Protocol):
    """What a device offers the plan."""

    is_measured: bool  # whether kernel_choice=auto times the candidates here (else the plan's default runs)
    dense_kernels: tuple[str, ...]  # candidates for full-precision weights, in preference order for a tie
    int8_kernels: tuple[str, ...]  # candidates for int8 W0s, likewise
    block_kernels: tuple[str, ...]  # candidates for W0s in Q4_1 or Q8_0 blocks, likewise
    max_rows_measured: Mapping[str, int]  # candidates timed only up to these rows (not run past them)

    def dense(self, kernel: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel: ...

    def quantized(
        self,
        kernel: str,
        weight: Int8Weight | BlockWeight,
        bias: torch.Tensor | None,
        dtype: torch.dtype,
        scratch: torch.Tensor | None,
    ) -> Kernel: ...  # one of int8_kernels for an int8 W0, of block_kernels for blocks

    def check_int8(self, device: torch.device) -> None: ...  # QuantizationError where int8 cannot run

    def check_blocks(self, device: torch.device) -> None: ...  # QuantizationError where blocks cannot run

    def gains_from_fusing(self, rule: KernelRule, weight: torch.Tensor) -> bool: ...

    def machine_name(self) -> str: ...  # what a measured plan is cached under


BACKENDS: dict[str, Backend] = {"cpu": cpu.CPU}  # by torch device type
# A device with no backend of its own runs the CPU backend's kernels, unmeasured: plain and int8 are
# aten ops that dispatch on the tensor's device, and `packed` falls back to plain off the CPU.
OTHER_DEVICES: Backend = dataclasses.replace(cpu.CPU, is_measured=False)


def backend_for(device: torch.device) -> Backend:
    return BACKENDS.get(device.type, OTHER_DEVICES)


def dense_kernel(rule: KernelRule, weight: torch.Tensor, bias: torch.Tensor | None) -> Kernel:
    """The rule's kernel for a full-precision [out, in] weight on its device."""
    backend = backend_for(weight.device)
    return by_rule(rule, lambda kernel: backend.dense(kernel, weight, bias), weight.shape[1])


def quantized_kernel(
    rule: KernelRule,
    weight: Int8Weight | BlockWeight,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
    scratch: torch.Tensor | None,
) -> Kernel:
    """The rule's kernel for a quantized W0; `scratch` ([out, in]: bf16 for int8, the model's dtype
    for blocks) is needed only for `dequantized`."""
    backend = backend_for(weight.device)
    return by_rule(rule, lambda kernel: backend.quantized(kernel, weight, bias, dtype, scratch), weight.shape[1])
