"""Read a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) and check it against a base.

The result is a `LoraAdapter`: per target module, A as [r, in] and B as [r, out] rows with the scale
that still multiplies them, as views of the file's bytes: loading them into a device slot casts
them and folds the scale into B (slots.py), so neither the merge nor the gather path ever
multiplies by a scale again, and a parse copies nothing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import NamedTuple

import torch

from .config import CONFIG_FILE, WEIGHTS_FILE, LoraConfig
from .errors import IncompatibleAdapterError, InvalidAdapterError, UnsafeAdapterFormatError, UnsupportedAdapterError
from .factor_values import all_finite, extremes_finite, loads_finite
from .identity import adapter_identity
from .parameters import ParamShape, fold_parameter, parameter_pairs
from .parse_ahead import FileChecks
from .safetensors_view import tensor_views

PICKLE_FILE = "adapter_model.bin"
# PEFT saves "base_model.model.<module>.lora_A.weight" (and lora_B.bias with lora_bias, the DoRA
# lora_magnitude_vector; an embedding's lora_embedding_A/B, and its or the head's full matrix as
# base_layer.weight); raw state dicts keep the adapter name too ("lora_A.default.weight").
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector|"
    r"lora_embedding_A|lora_embedding_B|base_layer|token_adapter\.trainable_tokens_delta)"
    r"(?:\.(?!weight$|bias$)[^.]+)?(?:\.(?P<kind>weight|bias))?$"
)
_PARTS = {
    ("lora_A", "weight"): "A",
    ("lora_B", "weight"): "B",
    ("lora_B", "bias"): "bias",
    ("lora_magnitude_vector", None): "magnitude",
    ("lora_magnitude_vector", "weight"): "magnitude",
    ("lora_embedding_A", None): "A",
    ("lora_embedding_B", None): "B",
    ("base_layer", "weight"): "full",
    ("token_adapter.trainable_tokens_delta", None): "tokens",
}

log = logging.getLogger(__name__)

AdapterSource = str | Path | Mapping[str, bytes | memoryview]
"""A directory on disk, or the two files' bytes keyed by file name (an upload, a source's fetch)."""


class LoraWeights(NamedTuple):
    a: torch.Tensor  # [r, in], any float dtype: cast where it is loaded
    b: torch.Tensor  # [r, out] (maybe a transposed view of the file's [out, r]), any float dtype
    bias: torch.Tensor | None = None  # [out], scale folded in (lora_bias: PEFT's lora_B.bias)
    magnitude: torch.Tensor | None = None  # [out], DoRA's m; its norm needs W0, so the layer divides
    scale: float = 1.0  # multiplies b: a slot holds factor_values.slot_values(b, scale, its dtype)


class TargetSpec(NamedTuple):
    """What an adapter may touch on a base: wrappable modules' shapes and every module name."""

    shapes: Mapping[str, tuple[int, int]]  # name -> (in_features, out_features)
    module_names: frozenset[str]
    base_name: str | None = None
    full_weights: Mapping[str, torch.Tensor] = {}  # the embedding's and the head's W0, read-only
    embeddings: frozenset[str] = frozenset()  # modules that are token embeddings (lora_embedding_A/B)
    tied_head: str | None = None  # the output head, when it shares the embedding's matrix
    row_modules: Mapping[str, Mapping[str, tuple[int, ...]]] = {}  # copies servable per row: name -> shapes
    parameters: Mapping[str, ParamShape] = {}  # parameters LoRA can target (target_parameters): experts, routers
    parameter_names: tuple[str, ...] = ()  # every parameter of the base, in registration order


@dataclass(eq=False)
class LoraAdapter:
    """A validated adapter in host memory, ready to copy into a device slot or merge."""

    name: str
    config: LoraConfig
    weights: dict[str, LoraWeights]
    modules: dict[str, dict[str, torch.Tensor]] = dataclass_field(default_factory=dict)  # full copies: module -> params
    identity: bytes = b""  # what it computes, never its name: identity.py

    @property
    def rank(self) -> int:
        return max(w.a.shape[-2] for w in self.weights.values())  # experts' A is [E, r, in]

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.weights)

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self._tensors())

    def _tensors(self):
        yield from (t for w in self.weights.values() for t in (w.a, w.b, w.bias, w.magnitude) if t is not None)
        yield from (t for params in self.modules.values() for t in params.values())

    @property
    def is_dora(self) -> bool:
        return self.config.use_dora


READABLE_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})


def read_files(
    source: AdapterSource, views: Callable[[bytes | memoryview], dict[str, torch.Tensor]] = tensor_views
) -> tuple[bytes, bytes | memoryview, dict[str, torch.Tensor]]:
    """The config's bytes, the weights file's, and its tensors as views of those bytes (never
    copies; `views` makes them), from a directory or an upload's files."""
    files = _FileView(source)
    config_bytes = files.read(CONFIG_FILE)
    if config_bytes is None:
        raise InvalidAdapterError("file is missing", file=CONFIG_FILE)
    weights_bytes = files.read(WEIGHTS_FILE)
    if weights_bytes is None:
        if files.has(PICKLE_FILE):
            raise UnsafeAdapterFormatError(
                "pickle weights are refused because loading them can run arbitrary code; convert "
                "them to safetensors (e.g. PeftModel.save_pretrained(..., safe_serialization=True))",
                file=PICKLE_FILE,
            )
        raise InvalidAdapterError("file is missing", file=WEIGHTS_FILE)
    try:
        tensors = views(weights_bytes)
    except ValueError as exc:
        raise InvalidAdapterError(f"not a readable safetensors file ({exc})", file=WEIGHTS_FILE) from None
    for key, tensor in tensors.items():
        if tensor.dtype not in READABLE_DTYPES:  # float8 and ints: the slot loads and merges have no kernel for them
            raise InvalidAdapterError(
                f"tensor {key!r} is {tensor.dtype}; adapter weights must be float16, bfloat16, float32 or float64",
                file=WEIGHTS_FILE,
                field=key,
            )
    return config_bytes, weights_bytes, tensors


class _FileView:
    """An adapter's files, from a directory or an upload; an OSError reading the directory (a name
    past the filesystem's limit, no permission) is a typed error naming the file, not a crash."""

    def __init__(self, source: AdapterSource):
        self.source = source if isinstance(source, Mapping) else Path(source)
        if isinstance(self.source, Path) and not _reading(self.source.is_dir, str(self.source)):
            raise InvalidAdapterError(f"adapter directory {str(self.source)!r} does not exist")

    def has(self, name: str) -> bool:
        if isinstance(self.source, Path):
            return _reading(lambda: (self.source / name).is_file(), name)
        return name in self.source

    def read(self, name: str) -> bytes | None:
        if not self.has(name):
            return None
        if isinstance(self.source, Path):
            return _reading(lambda: (self.source / name).read_bytes(), name)
        return self.source[name]


def _reading(call, file: str):
    try:
        return call()
    except OSError as exc:
        raise InvalidAdapterError(f"cannot be read ({exc.strerror or exc})", file=file) from None


def load_adapter(
    name: str,
    source: AdapterSource,
    spec: TargetSpec,
    *,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    checks: FileChecks | None = None,
) -> LoraAdapter:
    """Read, validate against `spec`, and return the adapter (its factors views of the files' bytes);
    raise a typed error otherwise. `checks`: the weights file's views, digest and extremes, taken
    already where a `ParseAhead` saw it arrive."""
    checks = checks or FileChecks()
    config_bytes, weights_bytes, tensors = read_files(source, checks.views)
    config = LoraConfig.from_json(config_bytes)
    facts = checks.facts(weights_bytes, tensors)
    pairs, full, other = _pair_tensors(tensors, config)
    parameters = parameter_pairs(pairs, config, spec)  # taken out of `pairs`: what is left targets modules
    _check_targets(config, pairs, spec)
    modules = _saved_modules(other, config, spec, dtype)
    modules.update(_changed_full_weights({m: t for (part, m), t in full.items() if part == "full"}, spec, dtype))
    modules.update(
        _trainable_tokens({m: t for (part, m), t in full.items() if part == "tokens"}, config, spec, set(pairs), dtype)
    )
    # Every factor finite as its slot will hold it, proven from the file's extremes at each scale
    # (parse_ahead.py); else each is checked, and the one at fault named.
    scales = {1.0, *(config.scale_for(module) for module in pairs)}
    proven = facts.extremes is not None and all(extremes_finite(facts.extremes, s, dtype) for s in scales)
    weights = {
        module: _lora_weights(module, parts, config, spec, max_rank, dtype, check_values=not proven)
        for module, parts in sorted(pairs.items())
    }
    weights.update(
        (param, LoraWeights(*fold_parameter(param, key, parts, config, spec.parameters[param], max_rank, dtype)))
        for param, (key, parts) in sorted(parameters.items())
    )
    if spec.base_name and config.base_model_name_or_path not in (None, "", spec.base_name):
        log.warning(
            "adapter %r was trained on %r, serving it on %r because the shapes fit",
            name,
            config.base_model_name_or_path,
            spec.base_name,
        )
    return LoraAdapter(name, config, weights, modules, adapter_identity(config, facts.digest))


def read_factors(source: AdapterSource) -> tuple[dict, LoraConfig, dict[str, LoraWeights]]:
    """The raw config, its parse, and each module's factors in float64 (B scaled by the config's s for
    that module), checked as pairs but not against a base: what analysis and compression start from."""
    config_bytes, _, tensors = read_files(source)
    config = LoraConfig.from_json(config_bytes)
    if config.target_parameters:  # served (experts.py), but the analyses read [r, in] / [out, r] pairs only
        raise UnsupportedAdapterError(
            "analysis and compression do not read parameter-targeted LoRA (MoE experts) yet",
            file=CONFIG_FILE,
            field="target_parameters",
        )
    factors = {}
    for module, parts in sorted(_pair_tensors(tensors, config)[0].items()):
        a, b = parts["A"], parts["B"]
        _check_pair(module, a, b, config)
        factors[module] = LoraWeights(a.double(), b.double().mul(config.scale_for(module)).t())
    return json.loads(config_bytes), config, factors


def _pair_tensors(
    tensors: dict[str, torch.Tensor], config: LoraConfig
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """module -> {"A", "B"[, "bias"][, "magnitude"]}: exactly the parts the config says each module has;
    module -> the full matrix saved beside an embedding's or head's LoRA (base_layer.weight); and the
    other tensors by key, when the config has modules_to_save (their copies)."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[tuple[str, str], torch.Tensor] = {}  # ("full" or "tokens", module) -> tensor
    other: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        part = _PARTS.get((match["part"], match["kind"])) if match else None
        if part is None and config.modules_to_save:
            other[key.removeprefix("base_model.model.")] = tensor
            continue
        if part is None:
            raise InvalidAdapterError(
                f"unexpected tensor {key!r}: only lora_A/lora_B weights (and lora_B "
                "biases, DoRA magnitudes, embedding LoRA) are served",
                file=WEIGHTS_FILE,
                field=key,
            )
        if part in ("full", "tokens"):
            full[part, match["module"]] = tensor
        else:
            found.setdefault(match["module"], {})[part] = tensor
    wanted = {"A": "lora_A.weight", "B": "lora_B.weight", "bias": "lora_B.bias", "magnitude": "lora_magnitude_vector"}
    if not config.lora_bias:
        del wanted["bias"]
    if not config.use_dora:
        del wanted["magnitude"]
    for module, parts in sorted(found.items()):  # sorted: the error names the same module every time
        for part, suffix in wanted.items():
            if part not in parts:
                raise InvalidAdapterError(
                    f"{suffix} for module {module!r} is missing", file=WEIGHTS_FILE, field=f"{module}.{suffix}"
                )
        for part in set(parts) - set(wanted):
            flag = "lora_bias" if part == "bias" else "use_dora"
            raise InvalidAdapterError(
                f"module {module!r} has a {part} tensor but the config does not set {flag}",
                file=CONFIG_FILE,
                field=flag,
            )
    if not found:
        raise InvalidAdapterError("contains no LoRA tensors", file=WEIGHTS_FILE)
    return found, full, other


def _saved_modules(
    tensors: Mapping[str, torch.Tensor], config: LoraConfig, spec: TargetSpec, dtype: torch.dtype
) -> dict[str, dict[str, torch.Tensor]]:
    """modules_to_save: each saved module's full parameters, checked to be servable per row and to fit."""
    selected = sorted((name for name in spec.module_names if config.saves(name)), key=len, reverse=True)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sorted(tensors.items()):
        module = next((name for name in selected if key.startswith(name + ".")), None)
        if module is None:
            raise InvalidAdapterError(
                f"unexpected tensor {key!r}: neither LoRA nor a module modules_to_save selects",
                file=WEIGHTS_FILE,
                field=key,
            )
        shapes = spec.row_modules.get(module)
        if shapes is None:
            raise UnsupportedAdapterError(
                f"a full copy of {module!r} cannot be served per row (only linear, embedding and norm modules can)",
                file=CONFIG_FILE,
                field="modules_to_save",
            )
        param = key[len(module) + 1 :]
        if shapes.get(param) != tuple(tensor.shape):
            raise UnsupportedAdapterError(
                f"shape {tuple(tensor.shape)} does not fit the base's {shapes.get(param)} "
                "(a resized vocabulary cannot be served beside the base's rows)",
                file=WEIGHTS_FILE,
                field=key,
            )
        if not tensor.is_floating_point() or not all_finite(tensor):
            raise InvalidAdapterError("contains NaN, Inf or non-float values", file=WEIGHTS_FILE, field=key)
        modules.setdefault(module, {})[param] = tensor.to(dtype).contiguous()
    for module, params in modules.items():
        missing = sorted(set(spec.row_modules[module]) - set(params))
        if missing:
            raise InvalidAdapterError(
                f"the copy of {module!r} has no {missing[0]!r}", file=WEIGHTS_FILE, field=f"{module}.{missing[0]}"
            )
    return modules


def _trainable_tokens(
    deltas: Mapping[str, torch.Tensor], config: LoraConfig, spec: TargetSpec, lora_modules: set[str], dtype: torch.dtype
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT's trainable tokens: new rows for some token ids of an embedding (and of the head tied to it)."""
    indices = config.trainable_token_indices
    if isinstance(indices, list):
        indices = {next(iter(sorted(spec.embeddings)), "embed_tokens"): indices}
    wanted = {
        name: list(ids)
        for key, ids in (indices or {}).items()
        for name in spec.module_names
        if name == key or name.endswith("." + key)
    }
    field = "trainable_token_indices"
    modules = {}
    for module, ids in sorted(wanted.items()):
        delta, base = deltas.get(module), spec.full_weights.get(module)
        if base is None:
            raise UnsupportedAdapterError(
                f"trainable tokens of {module!r}: only the embedding's and the head's are served",
                file=CONFIG_FILE,
                field=field,
            )
        if module in lora_modules:
            raise UnsupportedAdapterError(
                f"{module!r} has both LoRA and trainable tokens", file=CONFIG_FILE, field=field
            )
        key = f"{module}.token_adapter.trainable_tokens_delta"
        if delta is None:
            raise InvalidAdapterError("is missing", file=WEIGHTS_FILE, field=key)
        if tuple(delta.shape) != (len(ids), base.shape[1]) or not all(0 <= i < base.shape[0] for i in ids):
            raise IncompatibleAdapterError(
                f"{len(ids)} token ids in [0, {base.shape[0]}) need rows "
                f"({len(ids)}, {base.shape[1]}), got {tuple(delta.shape)}",
                file=WEIGHTS_FILE,
                field=key,
            )
        if not delta.is_floating_point() or not all_finite(delta):
            raise InvalidAdapterError("contains NaN, Inf or non-float values", file=WEIGHTS_FILE, field=key)
        rows = {"token_ids": torch.tensor(ids, dtype=torch.long), "token_rows": delta.to(dtype).contiguous()}
        modules[module] = rows
        if module in spec.embeddings and spec.tied_head:  # PEFT applies them to the tied head as well
            modules[spec.tied_head] = rows
    for module in sorted(set(deltas) - set(wanted)):
        raise InvalidAdapterError(
            "trainable_token_indices does not select this module",
            file=WEIGHTS_FILE,
            field=f"{module}.token_adapter.trainable_tokens_delta",
        )
    return modules


def _changed_full_weights(
    full: Mapping[str, torch.Tensor], spec: TargetSpec, dtype: torch.dtype
) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT saves the embedding's or head's whole matrix beside its LoRA (save_embedding_layers): a
    copy of the base's is ignored; one that differs (retrained) is served like modules_to_save."""
    changed = {}
    for module, tensor in sorted(full.items()):
        field = f"{module}.base_layer.weight"
        base = spec.full_weights.get(module)
        if base is None:
            raise InvalidAdapterError(
                f"a full matrix is saved for {module!r}, which is not the base's embedding or output head",
                file=WEIGHTS_FILE,
                field=field,
            )
        if tuple(tensor.shape) != tuple(base.shape):
            raise UnsupportedAdapterError(
                f"shape {tuple(tensor.shape)} differs from the base's {tuple(base.shape)} "
                "(a resized vocabulary): its rows cannot be served beside the base's",
                file=WEIGHTS_FILE,
                field=field,
            )
        tensor = tensor.to(base.device, dtype)
        if not all_finite(tensor):
            raise InvalidAdapterError("contains NaN, Inf or non-float values", file=WEIGHTS_FILE, field=field)
        if not torch.equal(tensor, base):
            changed[module] = {"weight": tensor.to("cpu").contiguous()}
    return changed


def _check_targets(config: LoraConfig, pairs: Mapping, spec: TargetSpec) -> None:
    """Every configured target exists in the base, and tensors match the targets exactly."""
    targets = [config.target_modules] if isinstance(config.target_modules, str) else config.target_modules or []
    for target in targets:
        if not any(config.targets(name) for name in spec.module_names if _selects(config, target, name)):
            raise IncompatibleAdapterError(
                f"{target!r} matches no module of the base model", file=CONFIG_FILE, field="target_modules"
            )
    expected = {name for name in spec.module_names if config.targets(name)}
    for module in pairs:
        if module not in spec.module_names:
            raise IncompatibleAdapterError(
                f"the base model has no module {module!r}", file=WEIGHTS_FILE, field=f"{module}.lora_A.weight"
            )
        if module not in expected:
            raise InvalidAdapterError(
                f"module {module!r} has weights but target_modules does not select it",
                file=WEIGHTS_FILE,
                field=f"{module}.lora_A.weight",
            )
        if module not in spec.shapes:
            raise UnsupportedAdapterError(
                f"module {module!r} is not a Linear, Conv1D or the input embedding",
                file=CONFIG_FILE,
                field="target_modules",
            )
    missing = sorted(expected - set(pairs))
    if missing:
        raise InvalidAdapterError(
            f"no weights for targeted module(s) {', '.join(missing[:3])}"
            + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""),
            file=WEIGHTS_FILE,
            field=f"{missing[0]}.lora_A.weight",
        )


def _selects(config: LoraConfig, target: str, name: str) -> bool:
    if isinstance(config.target_modules, str):
        return True
    return name == target or name.endswith("." + target)


def _lora_weights(
    module: str,
    parts: dict[str, torch.Tensor],
    config: LoraConfig,
    spec: TargetSpec,
    max_rank: int,
    dtype: torch.dtype,
    check_values: bool = True,
) -> LoraWeights:
    field_a, field_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    a, b = parts["A"], parts["B"]
    _check_pair(module, a, b, config, values=False)  # values: checked as a slot will hold them (below)
    if module in spec.embeddings and ("bias" in parts or "magnitude" in parts):
        raise UnsupportedAdapterError(
            f"DoRA and LoRA biases on the embedding {module!r} are not supported",
            file=CONFIG_FILE,
            field="use_dora" if "magnitude" in parts else "lora_bias",
        )
    rank = a.shape[0]
    if rank > max_rank:
        raise UnsupportedAdapterError(
            f"rank {rank} of {module!r} exceeds the server's max_lora_rank {max_rank}", file=CONFIG_FILE, field="r"
        )
    in_features, out_features = spec.shapes[module]
    if a.shape[1] != in_features or b.shape[0] != out_features:
        raise IncompatibleAdapterError(
            f"A {tuple(a.shape)} / B {tuple(b.shape)} do not fit the base layer ({in_features} -> {out_features})",
            file=WEIGHTS_FILE,
            field=field_a,
        )
    scale = config.scale_for(module)
    extras = {part: _vector(module, part, parts[part], out_features) for part in ("bias", "magnitude") if part in parts}
    if "bias" in extras:
        extras["bias"] = extras["bias"].float().mul(scale)
    # One check of the factors as a slot will hold them finds NaN or Inf in the file (they survive
    # scaling and casting) and values finite in the file that overflow once scaled and cast (fp16
    # tops out at 65504).
    a_finite = not check_values or loads_finite(a, 1.0, dtype)
    b_finite = not check_values or loads_finite(b, scale, dtype)
    weights = LoraWeights(
        a,
        b.t(),  # [r, out]: a view
        **{part: tensor.to(dtype).contiguous() for part, tensor in extras.items()},
        scale=scale,
    )
    bias_finite = weights.bias is None or all_finite(weights.bias)
    fields = ((field_a, a, a_finite), (field_b, b, b_finite), (f"{module}.lora_B.bias", None, bias_finite))
    for field, raw, finite in fields:
        if not finite:
            if raw is not None and not all_finite(raw):
                raise InvalidAdapterError("contains NaN, Inf or non-float values", file=WEIGHTS_FILE, field=field)
            raise InvalidAdapterError(
                f"overflows {dtype} once cast (and B scaled by the config's alpha)", file=WEIGHTS_FILE, field=field
            )
    return weights


def _check_pair(module: str, a: torch.Tensor, b: torch.Tensor, config: LoraConfig, values: bool = True) -> None:
    """A [r, in] and B [out, r] of the rank the config gives this module, floats (and finite, unless
    the caller checks `values` itself)."""
    field_a, field_b = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise InvalidAdapterError(
            f"A {tuple(a.shape)} and B {tuple(b.shape)} are not a rank-r pair", file=WEIGHTS_FILE, field=field_a
        )
    if a.shape[0] != config.rank_for(module):
        raise InvalidAdapterError(
            f"weights have rank {a.shape[0]} but the config gives {config.rank_for(module)}",
            file=CONFIG_FILE,
            field="rank_pattern" if config.rank_pattern else "r",
        )
    for field, tensor in ((field_a, a), (field_b, b)):
        if not tensor.is_floating_point() or (values and not all_finite(tensor)):
            raise InvalidAdapterError("contains NaN, Inf or non-float values", file=WEIGHTS_FILE, field=field)


def _vector(module: str, part: str, tensor: torch.Tensor, out_features: int) -> torch.Tensor:
    """A lora_B bias or DoRA magnitude: a finite float vector with one entry per output feature."""
    field = f"{module}.{'lora_B.bias' if part == 'bias' else 'lora_magnitude_vector'}"
    if tuple(tensor.shape) != (out_features,):
        raise IncompatibleAdapterError(
            f"shape {tuple(tensor.shape)} does not fit the base layer's {out_features} outputs",
            file=WEIGHTS_FILE,
            field=field,
        )
    if not tensor.is_floating_point() or not all_finite(tensor):
        raise InvalidAdapterError("contains NaN, Inf or non-float values", file=WEIGHTS_FILE, field=field)
    return tensor
