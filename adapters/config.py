"""PEFT's `adapter_config.json` for LoRA, and PEFT's rules for which module gets which rank and scale."""

from __future__ import annotations

import functools
import json
import math
import re
from typing import Any, NamedTuple

import re2
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import InvalidAdapterError, UnsupportedAdapterError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


class Refused(NamedTuple):
    why: str
    off: tuple = (None, False, "", [], {})  # values that leave the feature off


# Every field of PEFT's LoraConfig (checked against peft 0.21) is in exactly one of these three
# groups. Supporting a feature moves its field from REFUSED to SUPPORTED, with a field on LoraConfig.
# A field in no group (a newer PEFT's) is refused when set: we cannot know that it is harmless.
SUPPORTED = frozenset(
    {  # read by LoraConfig below: they decide the targets, ranks and scales
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "target_modules",
        "exclude_modules",
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layers_pattern",
        "base_model_name_or_path",
        "use_dora",
        "lora_bias",  # DoRA's per-feature magnitude; a trained bias on lora_B
        "modules_to_save",  # full copies of row-wise modules (norms, linears, embedding, head), served per row
        "trainable_token_indices",  # new rows for some token ids of the embedding (and its tied head)
        "target_parameters",  # LoRA on parameters (PEFT's ParamWrapper): MoE experts and routers (experts.py)
    }
)
INFERENCE_NEUTRAL = frozenset(
    {  # accepted and ignored: none changes what a loaded adapter computes
        "task_type",
        "auto_mapping",  # which PEFT/transformers wrapper class to build, not the LoRA math
        "peft_version",
        "revision",  # bookkeeping: the PEFT release, the base checkpoint's revision
        "inference_mode",
        "lora_dropout",  # training-only: frozen weights, dropout is identity at eval
        "fan_in_fan_out",  # PEFT sets it from the base layer's type (Conv1D or Linear), as we do
        "megatron_config",
        "megatron_core",  # which parallel linear class holds the same math
        "runtime_config",  # where PEFT keeps the weights at run time (ephemeral GPU offload)
        "velora_config",  # a memory-saving backward pass; the forward is plain LoRA
        "eva_config",  # initial values of A and B only; the file holds the trained ones
        "loftq_config",
        "corda_config",
        "astra_config",
        "lora_ga_config",  # read only by init methods refused below
        "qalora_group_size",  # read only with use_qalora, refused below
    }
)
REFUSED = {  # change the outputs, and we do not serve them: refused by name when set
    "bias": Refused("LoRA bias terms are not supported; train with bias='none'", off=("none",)),
    "layer_replication": Refused("layer replication changes the base model's layer stack"),
    "alora_invocation_tokens": Refused("Activated LoRA (applied only after its invocation tokens) is not supported"),
    "use_qalora": Refused("QALoRA (pooled adapter inputs) is not supported"),
    "use_bdlora": Refused("block-diagonal LoRA factors are not supported"),
    "monteclora_config": Refused("MonteCLoRA's sampled variational terms are not supported"),
    "arrow_config": Refused("Arrow routing between adapters is not supported"),
    "kasa_config": Refused("KaSA (truncated base weights plus a singular-value diagonal) is not supported"),
    "ensure_weight_tying": Refused("adapters tied across tied layers are not supported"),
    # PiSSA, OLoRA, CorDA, Astra, LoftQ and LoRA-GA rewrite the base weights; the others set A and B only.
    "init_lora_weights": Refused(
        "this initialisation rewrites the base weights; save the adapter converted to plain LoRA",
        off=(True, False, "gaussian", "eva", "orthogonal", "mica"),
    ),
}


class LoraConfig(BaseModel):
    """The fields of a PEFT LoRA config that change what the adapter computes.

    Other fields are checked against SUPPORTED, INFERENCE_NEUTRAL and REFUSED above, then dropped.
    Config-supplied regexes are compiled at parse time and run with RE2 (linear time): PEFT's `re`
    semantics, except that RE2 has no backreferences or lookarounds (refused) and its \\d, \\w are ASCII.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    peft_type: str = "LORA"
    r: int = Field(8, gt=0)
    lora_alpha: float = 8
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    rank_pattern: dict[str, int] = Field(default_factory=dict)
    alpha_pattern: dict[str, float] = Field(default_factory=dict)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    base_model_name_or_path: str | None = None
    use_dora: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    # The name lists as sets: matching a module is a few lookups, not a scan of a list that a
    # config may repeat 100,000 times (a scan per module per target was quadratic).
    _target_names: frozenset[str] = PrivateAttr(frozenset())
    _excluded_names: frozenset[str] = PrivateAttr(frozenset())
    _parameter_names: frozenset[str] = PrivateAttr(frozenset())

    @model_validator(mode="before")
    @classmethod
    def _refuse_unserved_fields(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        file = (info.context or {}).get("file", CONFIG_FILE)
        for field, value in data.items():
            if field in SUPPORTED or field in INFERENCE_NEUTRAL:
                continue
            refused = REFUSED.get(
                field,
                Refused(f"unknown field (not in PEFT {_PEFT_CHECKED}); it may change the outputs, so it must be unset"),
            )
            if value not in refused.off:
                raise UnsupportedAdapterError(refused.why, file=file, field=field)
        return data

    @field_validator("target_modules", "exclude_modules", mode="after")
    @classmethod
    def _deduplicated(cls, value):
        """Each name once, in its first place: PEFT reads the lists as sets."""
        return list(dict.fromkeys(value)) if isinstance(value, list) else value

    def model_post_init(self, context: Any) -> None:
        """Compile every config-supplied regex once, now, so that a bad one fails the upload."""
        file = (context or {}).get("file", CONFIG_FILE)
        for attribute, field in (("_target_names", "target_modules"), ("_excluded_names", "exclude_modules")):
            value = getattr(self, field)
            setattr(self, attribute, frozenset(value) if isinstance(value, list) else frozenset())
        self._parameter_names = frozenset(self.target_parameters or ())
        for field, pattern in self._regexes():
            _compile(pattern, file, field)

    def _regexes(self):
        """(field, pattern as run) for each regex this config supplies, built as PEFT builds them."""
        for field in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, field), str):
                yield field, getattr(self, field)
        layers = [self.layers_pattern] if isinstance(self.layers_pattern, str) else self.layers_pattern or []
        for pattern in layers:
            yield "layers_pattern", _layers_regex(pattern)
        for field in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, field):
                yield f"{field}.{key}", _pattern_key_regex(key)

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _none_is_empty(cls, value):
        return {} if value is None else value

    @classmethod
    def from_json(cls, data: bytes | str, file: str = CONFIG_FILE) -> LoraConfig:
        """Parse and check a config; every failure is a typed error naming the file and field."""
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # also: a 4300-digit int, deep nesting
            raise InvalidAdapterError(f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})", file=file) from None
        if not isinstance(raw, dict):
            raise InvalidAdapterError("must be a JSON object", file=file)
        try:
            config = cls.model_validate(raw, context={"file": file})
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise InvalidAdapterError(first["msg"], file=file, field=field) from None
        config._check_supported(file)
        return config

    def _check_supported(self, file: str) -> None:
        def refuse(field: str, why: str):
            raise UnsupportedAdapterError(why, file=file, field=field)

        if self.peft_type.upper() != "LORA":
            refuse("peft_type", f"{self.peft_type!r} adapters are not served; only LORA")
        if self.target_modules is None and not self.target_parameters:
            refuse("target_modules", "must name the modules the adapter targets")
        if self.target_parameters and (self.use_dora or self.lora_bias):  # PEFT's ParamWrapper refuses them too
            flag = "use_dora" if self.use_dora else "lora_bias"
            refuse(flag, f"{flag} is not supported together with target_parameters (PEFT refuses it too)")
        if self.use_dora and self.lora_bias:  # PEFT's LoraConfig refuses the pair too
            refuse("lora_bias", "lora_bias is not supported together with use_dora (PEFT refuses it too)")
        if any(value <= 0 for value in self.rank_pattern.values()):
            raise InvalidAdapterError("ranks must be positive", file=file, field="rank_pattern")

    # PEFT's matching rules (peft.tuners.tuners_utils.check_target_module_exists).
    def targets(self, key: str) -> bool:
        """Whether PEFT would put a LoRA layer on the module named `key`."""
        if self._excluded(key):
            return False
        if isinstance(self.target_modules, str):
            return _regex(self.target_modules).fullmatch(key) is not None
        if key in self._target_names:  # a full module name is selected even outside layers_to_transform
            return True
        if self._target_names.isdisjoint(_dotted_suffixes(key)):  # no `key.endswith("." + t)`
            return False
        return self._in_transformed_layers(key)

    def _excluded(self, key: str) -> bool:
        excluded = self.exclude_modules
        if not excluded:
            return False
        if isinstance(excluded, str):
            return _regex(excluded).fullmatch(key) is not None
        return key in self._excluded_names or not self._excluded_names.isdisjoint(_dotted_suffixes(key))

    def _in_transformed_layers(self, key: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        patterns = self.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = _regex(_layers_regex(pattern)).match(key)
                if match:
                    break
        if not match:
            return False
        index = int(match.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted

    def targets_parameter(self, key: str) -> bool:
        """Whether PEFT would wrap the parameter named `key` (peft.tuners.tuners_utils._inject_parameters:
        the full name or a dotted suffix of it; no layer or exclusion rules apply to parameters)."""
        names = self._parameter_names
        return key in names or not names.isdisjoint(_dotted_suffixes(key))

    def saves(self, key: str) -> bool:
        """Whether a full copy of the module `key` may be in the file: its name ends with an entry as a
        plain string, PEFT's rule up to 0.21 ("norm" also selects "input_layernorm"). PEFT 0.22 selects
        whole dotted names only, a subset: the copies an adapter was saved with are served either way."""
        return any(key.endswith(name) for name in self.modules_to_save or ())

    def rank_for(self, key: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)

    def scale_for(self, key: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA, with per-module rank and alpha patterns."""
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        rank = self.rank_for(key)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _dotted_suffixes(key: str) -> list[str]:
    """What follows each '.' of `key`: t is one of them exactly when key.endswith("." + t)."""
    parts = key.split(".")
    return [".".join(parts[i:]) for i in range(1, len(parts))]


def _pattern_key(patterns: dict, key: str) -> str | None:
    """The first pattern that matches the end of `key` (peft.utils.other.get_pattern_key)."""
    for pattern in patterns:
        if _regex(_pattern_key_regex(pattern)).match(key):
            return pattern
    return None


_PEFT_CHECKED = "0.22"
_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a bad pattern is the uploader's error, reported to them, not logged


def _layers_regex(pattern: str) -> str:
    return rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."  # peft.tuners.tuners_utils.check_target_module_exists


def _pattern_key_regex(pattern: str) -> str:
    return rf"(.*\.)?({pattern})$"  # peft.utils.other.get_pattern_key


def _compile(pattern: str, file: str, field: str) -> None:
    """Refuse a pattern that PEFT's `re` or RE2 cannot compile (RE2: no backreferences, lookarounds)."""
    try:
        re.compile(pattern)
        _regex(pattern)
    except (re.error, re2.error, OverflowError, RecursionError) as exc:
        why = exc.args[0] if exc.args else type(exc).__name__
        why = why.decode(errors="replace") if isinstance(why, bytes) else why
        raise InvalidAdapterError(f"not a regular expression we can run ({why})", file=file, field=field) from None


@functools.lru_cache(maxsize=4096)
def _regex(pattern: str):
    """The compiled RE2 pattern: linear-time matching, so no config can stall the server."""
    return re2.compile(pattern, _RE2_OPTIONS)
