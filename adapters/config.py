"""PEFT's `adapter_config.json` for LoRA, and PEFT's rules for which module gets which rank and scale."""
from __future__ import annotations

import json
import math
import re

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import InvalidAdapterError, UnsupportedAdapterError

CONFIG_FILE = "adapter_config.json"


class LoraConfig(BaseModel):
    """The fields of a PEFT LoRA config that change what the adapter computes.

    Unknown fields (training-only knobs such as lora_dropout) are ignored, as PEFT does at inference.
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
    fan_in_fan_out: bool = False
    base_model_name_or_path: str | None = None
    # Features we refuse rather than silently ignore: each changes the outputs.
    use_dora: bool = False
    modules_to_save: list[str] | None = None
    bias: str = "none"
    lora_bias: bool = False
    target_parameters: list[str] | None = None

    @field_validator("rank_pattern", "alpha_pattern", mode="before")
    @classmethod
    def _none_is_empty(cls, value):
        return {} if value is None else value

    @classmethod
    def from_json(cls, data: bytes | str, file: str = CONFIG_FILE) -> "LoraConfig":
        """Parse and check a config; every failure is a typed error naming the file and field."""
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidAdapterError(f"not valid JSON ({exc})", file=file) from None
        if not isinstance(raw, dict):
            raise InvalidAdapterError("must be a JSON object", file=file)
        try:
            config = cls.model_validate(raw)
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
        if self.use_dora:
            refuse("use_dora", "DoRA adapters are not supported; train without use_dora")
        if self.modules_to_save:
            refuse("modules_to_save", "full-weight modules_to_save are not supported")
        if self.bias != "none" or self.lora_bias:
            refuse("bias", "LoRA bias terms are not supported; train with bias='none'")
        if self.target_parameters:
            refuse("target_parameters", "parameter-targeted LoRA is not supported")
        if self.target_modules is None:
            refuse("target_modules", "must name the modules the adapter targets")
        if any(value <= 0 for value in self.rank_pattern.values()):
            raise InvalidAdapterError("ranks must be positive", file=file, field="rank_pattern")

    # PEFT's matching rules (peft.tuners.tuners_utils.check_target_module_exists).
    def targets(self, key: str) -> bool:
        """Whether PEFT would put a LoRA layer on the module named `key`."""
        if self._excluded(key):
            return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, key) is not None
        if key in self.target_modules:  # a full module name is selected even outside layers_to_transform
            return True
        if not any(key.endswith("." + t) for t in self.target_modules):
            return False
        return self._in_transformed_layers(key)

    def _excluded(self, key: str) -> bool:
        excluded = self.exclude_modules
        if not excluded:
            return False
        if isinstance(excluded, str):
            return re.fullmatch(excluded, key) is not None
        return any(key == e or key.endswith("." + e) for e in excluded)

    def _in_transformed_layers(self, key: str) -> bool:
        wanted = self.layers_to_transform
        if wanted is None or wanted == []:
            return True
        patterns = self.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
        else:
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
                if match:
                    break
        if not match:
            return False
        index = int(match.group("idx"))
        return index == wanted if isinstance(wanted, int) else index in wanted

    def rank_for(self, key: str) -> int:
        return self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)

    def scale_for(self, key: str) -> float:
        """s = alpha / r, or alpha / sqrt(r) with rsLoRA, with per-module rank and alpha patterns."""
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        rank = self.rank_for(key)
        return alpha / (math.sqrt(rank) if self.use_rslora else rank)


def _pattern_key(patterns: dict, key: str) -> str | None:
    """The first pattern that matches the end of `key` (peft.utils.other.get_pattern_key)."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return None
