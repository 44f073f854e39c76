"""PEFT's target_parameters read as PEFT lays them out (adapters/parameters.py), and bad ones refused.

Each expert's delta the merge writes is compared with PEFT's own ParamWrapper.get_delta_weight, for
adapters that target both expert projections (nested wrappers), one of them, and the router, so a
misread nesting order, expert-major A or rank-major B would show here before any generation does.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from adapters import IncompatibleAdapterError, InvalidAdapterError, UnsupportedAdapterError, load_adapter, wrap_model
from support.families import model, pristine

pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys did not match")

TARGETS = {
    "all": dict(target_modules="all-linear"),  # Mixtral: both projections and the router
    "down": dict(target_modules=[], target_parameters=["down_proj"]),
    "up_and_router": dict(target_modules=[], target_parameters=["gate_up_proj", "gate.weight"]),
}


def peft_deltas(path) -> dict[str, torch.Tensor]:
    """parameter name -> PEFT's delta weight for it, in the parameter's own layout."""
    reference = PeftModel.from_pretrained(model("mixtral"), str(path)).eval()
    deltas = {}
    for name, module in reference.named_modules():
        if type(module).__name__ == "ParamWrapper":
            owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
            deltas[f"{owner}.{module.parameter_name}"] = module.get_delta_weight("default").detach()
    return deltas


@pytest.mark.parametrize("case", list(TARGETS))
@torch.no_grad()
def test_each_experts_merged_delta_is_peft_delta(tmp_path, make_peft_adapter, case):
    path = make_peft_adapter(pristine("mixtral"), tmp_path / case, r=4, lora_alpha=8, **TARGETS[case])
    lora_model = wrap_model(model("mixtral"))
    lora_model.load_slot(0, load_adapter(case, path, lora_model.spec, max_rank=lora_model.max_rank))
    expected = peft_deltas(path)
    lora_model.merge(0)
    merged = {
        name: slots.merged_weight - slots.weight
        for name, slots in lora_model.params.items()
        if slots.targets([(0, 1.0)])
    }
    lora_model.unmerge()
    targeted = {name for name, delta in merged.items() if delta.abs().max() > 0}
    assert all(slots.merged_weight is None for slots in lora_model.params.values())
    assert targeted == set(expected) and targeted
    for name in targeted:
        assert (merged[name] - expected[name]).abs().max() <= 1e-6 * expected[name].abs().max(), name


@pytest.fixture
def saved(tmp_path, make_peft_adapter):
    """(directory, its config, its tensors) of an adapter on both expert projections."""
    path = make_peft_adapter(pristine("mixtral"), tmp_path / "experts", r=4, **TARGETS["all"])
    return path, json.loads((path / "adapter_config.json").read_text()), load_file(path / "adapter_model.safetensors")


def rewrite(path, config: dict, tensors: dict) -> None:
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "adapter_model.safetensors"))


def load(path):
    lora_model = wrap_model(model("mixtral"))
    return load_adapter("x", path, lora_model.spec, max_rank=lora_model.max_rank)


INNER = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"  # gate_up_proj's


def test_a_missing_wrapper_is_named(saved):
    path, config, tensors = saved
    rewrite(path, config, {k: v for k, v in tensors.items() if ".experts.base_layer." not in k or ".1." not in k})
    with pytest.raises(
        InvalidAdapterError,
        match=r"experts\.base_layer\.lora_A\.weight: no weights for .*layers\.1\.mlp\.experts\.gate_up_proj",
    ):
        load(path)


def test_a_wrong_rank_or_shape_is_named(saved):
    path, config, tensors = saved
    rewrite(path, {**config, "rank_pattern": {}}, tensors)  # gate/up saved at rank 8, the config now says 4
    with pytest.raises(InvalidAdapterError, match="rank 8 per expert but the config gives 4"):
        load(path)
    rewrite(path, config, {**tensors, INNER: tensors[INNER][:, :32].contiguous()})
    with pytest.raises(IncompatibleAdapterError, match="do not fit parameter"):
        load(path)


def test_a_target_parameter_matching_nothing_and_dora_are_refused(saved):
    path, config, tensors = saved
    rewrite(path, {**config, "target_parameters": [*config["target_parameters"], "nope_proj"]}, tensors)
    with pytest.raises(IncompatibleAdapterError, match="'nope_proj' matches no parameter"):
        load(path)
    rewrite(path, {**config, "use_dora": True}, tensors)
    with pytest.raises(UnsupportedAdapterError, match="use_dora is not supported together with target_parameters"):
        load(path)
