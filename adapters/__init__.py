"""loraserve's adapter core: read PEFT LoRA adapters and apply them to one frozen base model,
merged (zero per-token cost) or gathered per row (a batch can mix adapters)."""

from .batch import BASE_SLOT, LoraBatch
from .config import LoraConfig
from .errors import (
    AdapterCapacityError,
    AdapterError,
    AdapterExistsError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    InvalidAdapterError,
    MergeBudgetError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
)
from .layer import LoraLinear
from .model import BASE_MIX, LoraModel, SlotMix, wrap_model
from .ops import add_lora, add_lora_reference
from .peft_format import LoraAdapter, LoraWeights, TargetSpec, load_adapter
from .registry import AdapterInfo, AdapterLease, AdapterRegistry, AdapterVersion

__all__ = [
    "BASE_MIX",
    "BASE_SLOT",
    "AdapterCapacityError",
    "AdapterError",
    "AdapterExistsError",
    "AdapterInfo",
    "AdapterLease",
    "AdapterNotFoundError",
    "AdapterRegistry",
    "AdapterVersion",
    "IncompatibleAdapterError",
    "InvalidAdapterError",
    "LoraAdapter",
    "LoraBatch",
    "LoraConfig",
    "LoraLinear",
    "LoraModel",
    "LoraWeights",
    "MergeBudgetError",
    "SlotMix",
    "TargetSpec",
    "UnsafeAdapterFormatError",
    "UnsupportedAdapterError",
    "add_lora",
    "add_lora_reference",
    "load_adapter",
    "wrap_model",
]
