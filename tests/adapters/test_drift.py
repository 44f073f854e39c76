"""Merged mode must not drift: W0 is never written, so any number of swaps leaves it bit-identical
(PEFT-style W += delta; W -= delta would round away the base weights in fp16/bf16)."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters import AdapterRegistry, wrap_model
from adapters.kernels import PACKED, PLAIN, KernelPlan

NUM_SWAPS = 1000


@pytest.fixture(scope="module")
def drift_paths(tiny_llama, tmp_path_factory, make_peft_adapter):
    root = tmp_path_factory.mktemp("drift")
    adapters = dict(
        x=dict(r=8, lora_alpha=16, target_modules="all-linear"),
        y=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        z=dict(r=16, lora_alpha=8, target_modules=["gate_proj", "down_proj", "o_proj"], use_rslora=True),
    )
    return {name: make_peft_adapter(tiny_llama, root / name, **kw) for name, kw in adapters.items()}


@torch.no_grad()
def forward(lora_model, ids):
    return lora_model.model(ids).logits


@pytest.mark.parametrize(
    "dtype, kernel",
    [
        (torch.float32, PLAIN),
        (torch.float16, PLAIN),
        (torch.bfloat16, PLAIN),
        (torch.float32, PACKED),
        (torch.bfloat16, PACKED),
    ],
    ids=["float32", "float16", "bfloat16", "float32-packed", "bfloat16-packed"],
)
def test_merged_swaps_do_not_drift(tiny_llama, drift_paths, token_ids, dtype, kernel):
    lora_model = wrap_model(copy.deepcopy(tiny_llama).to(dtype), max_loras=3, max_rank=16, kernels=KernelPlan(kernel))
    registry = AdapterRegistry(lora_model)
    for name, path in drift_paths.items():
        registry.add(name, path)
    slots = [registry.acquire(name).slot for name in drift_paths]  # x, y, z
    weights_before = {name: t.clone() for name, t in lora_model.model.state_dict().items()}
    base_out = forward(lora_model, token_ids)

    lora_model.merge(slots[0])
    first_x = forward(lora_model, token_ids)
    assert not torch.equal(first_x, base_out), "merging x must change the output"
    for swap in range(NUM_SWAPS):
        lora_model.merge(slots[swap % 3])
    lora_model.merge(slots[0])
    assert torch.equal(forward(lora_model, token_ids), first_x)

    lora_model.unmerge()
    for name, before in weights_before.items():
        assert torch.equal(lora_model.model.state_dict()[name], before), f"{name} drifted"
    assert torch.equal(forward(lora_model, token_ids), base_out)
