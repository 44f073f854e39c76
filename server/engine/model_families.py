"""The model families the engine serves, and the checks that refuse everything else at startup.

A family is served when it is a row of FAMILIES and its test (tests/engine/test_model_families.py)
shows it equal to PEFT, alone and in mixed batches: transformers keeps its modules, the engine's
attention is swapped in by name (attention.py), and LoRA wraps its linears (adapters/model.py).
A new family is one row here and one entry in that test. Two checks guard the rest:
  - `check_architecture`, from the config alone, before any weight is read: a family not in the
    table, or a feature of a served family's config the engine does not implement (ALiBi);
  - `inspect_model`, from the loaded model: attention_probe.py runs its forward once and returns
    the KV geometry, refusing any attention feature (softcap, sinks, a new mask kind) by name.
Sliding windows are served past the window on every attention path (attention.py): each layer's
window is read from the model's own mask by the probe, and attention keeps keys kv > q - W, as
transformers does; a mask rule that is neither causal nor such a window is refused.
"""

from __future__ import annotations

import torch

from .attention_probe import AttentionShape, UnsupportedModelError, probe_attention

# model_type -> the family's name in docs/models.md, where each row says what its test covers.
FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "mixtral": "Mixtral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
    "qwen2_moe": "Qwen2-MoE",
    "olmoe": "OLMoE",
    "flex_olmo": "FlexOlmo",
    "glm4_moe": "GLM-4-MoE",
    "ernie4_5_moe": "ERNIE 4.5 MoE",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gemma3_text": "Gemma 3",
    "phi": "Phi",
    "phi3": "Phi-3",
    "olmo2": "OLMo 2",
    "granite": "Granite",
    "starcoder2": "Starcoder2",
    "cohere": "Cohere",
    "internlm3": "InternLM3",
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX",
    "gptj": "GPT-J",
    "falcon": "Falcon",
    "stablelm": "StableLM",
}


def check_architecture(config) -> None:
    """Refuse, from the config alone, a family the engine does not serve or a feature of a served
    family's config it does not implement; the message names the architecture and the feature."""
    architecture = ", ".join(getattr(config, "architectures", None) or []) or config.model_type
    if config.model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{architecture} (model_type {config.model_type!r}) is not a model family loraserve serves; "
            f"served: {', '.join(sorted(FAMILIES.values()))} (docs/models.md)"
        )
    if getattr(config, "alibi", False) or getattr(config, "position_embedding_type", None) == "alibi":
        raise UnsupportedModelError(
            f"{architecture} uses ALiBi position biases (alibi=True), which the engine's attention does not implement"
        )


def inspect_model(model: torch.nn.Module) -> AttentionShape:
    """The attention layers of a loaded model the engine can serve, or UnsupportedModelError."""
    check_architecture(model.config)
    return probe_attention(model)
