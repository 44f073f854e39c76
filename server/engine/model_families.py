"""The model families the engine serves, and the checks that refuse everything else at startup.

A family is served when it is a row of FAMILIES and its test (tests/engine/test_model_families.py)
shows it equal to PEFT, alone and in mixed batches: transformers keeps its modules, the engine's
attention is swapped in by name (attention.py), and LoRA wraps its linears (adapters/model.py).
A new family is one row here and one entry in that test. Two checks guard the rest:
  - `check_architecture`, from the config alone, before any weight is read: a family not in the
    table, or a feature of a served family's config the engine does not implement (ALiBi);
  - `inspect_model`, from the loaded model: attention_probe.py runs its forward once and returns
    the KV geometry, refusing any attention feature (softcap, sinks, a new mask kind) by name.
Sliding windows are served by capping the context at the smallest window (`served_context_len`),
as vLLM did before it implemented them: below the window a windowed layer sees every earlier key,
so every answer is exact. Implementing windows would need a per-layer lower key bound on every
attention path (per-sequence SDPA, the row kernel, chunked prefill); until then, no answer past
the window can be wrong because none is given.
"""

from __future__ import annotations

import logging

import torch

from .attention_probe import AttentionShape, UnsupportedModelError, probe_attention

log = logging.getLogger(__name__)

# model_type -> the family's name in docs/models.md, where each row says what its test covers.
FAMILIES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "mixtral": "Mixtral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "qwen3_moe": "Qwen3-MoE",
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


def served_context_len(attention: AttentionShape, max_positions: int, requested: int | None) -> int:
    """The longest context (prompt and output tokens) served, before the KV pool's own bound: the
    requested --max-model-len or the model's positions, capped at the smallest sliding window. An
    explicit request past the window is refused, naming it, rather than answered differently."""
    limit = requested or max_positions
    smallest = attention.smallest_window
    if smallest is None or smallest[0] >= limit:
        return limit
    window, layer = smallest
    if requested is not None:
        raise UnsupportedModelError(
            f"--max-model-len {requested} passes the sliding window of {window} tokens (layer {layer}): "
            f"the engine does not implement sliding windows, so it serves this model up to {window} tokens "
            "of context, where every answer is exact; give --max-model-len of at most that"
        )
    log.info(
        "the model's sliding window is %d tokens (layer %d): serving at most %d tokens of context, "
        "where every answer is exact (windows are not implemented past it)",
        window,
        layer,
        window,
    )
    return window
