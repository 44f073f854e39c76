"""PEFT's `target_parameters` (ParamWrapper): which saved tensors belong to which parameter, and their folds.

PEFT wraps each targeted parameter of a module in one more ParamWrapper, in the order the module
registers its parameters, so the first targeted one ends up innermost: for a Mixtral experts module
with both projections targeted, `experts.base_layer.lora_A` is `gate_up_proj`'s and `experts.lora_A`
is `down_proj`'s. The name saved is the nesting, never the parameter; `parameter_pairs` undoes it.

For a stacked [E, ·, ·] parameter, lora_A is [E·r, in] (expert-major: rows e·r .. e·r + r - 1) and
lora_B is [out, r·E] (rank-major: column k·E + e), and expert e's delta is s·B_e·A_e. A plain 2D
parameter (a router's weight) is an ordinary [out, in] LoRA pair.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch

from .config import CONFIG_FILE, WEIGHTS_FILE, LoraConfig
from .errors import IncompatibleAdapterError, InvalidAdapterError, UnsupportedAdapterError

if TYPE_CHECKING:
    from .peft_format import TargetSpec

FIELD = "target_parameters"


class ParamShape(NamedTuple):
    """A parameter LoRA can target: `num_experts` stacked maps in -> out, or 0 for a plain 2D weight."""

    num_experts: int
    in_features: int
    out_features: int


def parameter_pairs(
    pairs: dict[str, dict[str, torch.Tensor]], config: LoraConfig, spec: TargetSpec
) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """parameter -> (the module key its tensors are saved under, {"A", "B"}), each taken out of
    `pairs`; every targeted parameter must be one the server adapts and must have its tensors."""
    if not config.target_parameters:
        return {}
    targeted = [name for name in spec.parameter_names if config.targets_parameter(name)]
    matched = {suffix for name in targeted for suffix in _suffixes(name)}
    for entry in config.target_parameters:
        if entry not in matched:
            raise IncompatibleAdapterError(
                f"{entry!r} matches no parameter of the base model", file=CONFIG_FILE, field=FIELD
            )
    by_module: dict[str, list[str]] = {}
    for name in targeted:
        if name not in spec.parameters:
            raise UnsupportedAdapterError(
                f"LoRA on parameter {name!r} is not served: only MoE experts' stacked projections and their "
                "routers' weights are",
                file=CONFIG_FILE,
                field=FIELD,
            )
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    found = {}
    for module, params in by_module.items():
        for depth, param in enumerate(reversed(params)):  # the last registered is the outermost wrapper
            key = module + ".base_layer" * depth
            if key not in pairs:
                raise InvalidAdapterError(
                    f"no weights for targeted parameter {param!r}", file=WEIGHTS_FILE, field=f"{key}.lora_A.weight"
                )
            found[param] = (key, pairs.pop(key))
    return found


def _suffixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def fold_parameter(
    param: str,
    key: str,
    parts: Mapping[str, torch.Tensor],
    config: LoraConfig,
    shape: ParamShape,
    max_rank: int,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of `param` with its scale folded into B: [r, in] and [r, out] for a 2D weight,
    [E, r, in] and [E, r, out] for E stacked experts."""
    field_a, field_b = f"{key}.lora_A.weight", f"{key}.lora_B.weight"
    a, b = parts["A"], parts["B"]
    rank, experts = config.rank_for(param), max(shape.num_experts, 1)
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] % experts:
        raise InvalidAdapterError(
            f"A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair per expert",
            file=WEIGHTS_FILE,
            field=field_a,
        )
    if a.shape[0] != rank * experts:
        raise InvalidAdapterError(
            f"weights have rank {a.shape[0] // experts} per expert but the config gives {rank}",
            file=CONFIG_FILE,
            field="rank_pattern" if config.rank_pattern else "r",
        )
    if rank > max_rank:
        raise UnsupportedAdapterError(
            f"rank {rank} of {param!r} exceeds the server's max_lora_rank {max_rank}", file=CONFIG_FILE, field="r"
        )
    if a.shape[1] != shape.in_features or b.shape[0] != shape.out_features:
        raise IncompatibleAdapterError(
            f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit parameter {param!r} "
            f"({experts} x {shape.in_features} -> {shape.out_features})",
            file=WEIGHTS_FILE,
            field=field_a,
        )
    for field, tensor in ((field_a, a), (field_b, b)):
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise InvalidAdapterError("contains NaN, Inf or non-float values", file=WEIGHTS_FILE, field=field)
    b = b.float().mul(config.scale_for(param))  # [out, r·E]
    if shape.num_experts:
        a = a.reshape(experts, rank, shape.in_features)  # [E, r, in]
        b = b.reshape(shape.out_features, rank, experts).permute(2, 1, 0)  # [E, r, out]
    else:
        b = b.t()  # [r, out]
    a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
    if not torch.isfinite(b).all():  # finite in the file can still overflow once scaled and cast
        raise InvalidAdapterError(
            f"overflows {dtype} once scaled by the config's alpha", file=WEIGHTS_FILE, field=field_b
        )
    return a, b
