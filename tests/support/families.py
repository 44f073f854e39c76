"""A tiny random model of each served family (server/engine/model_families.py), built from its
config (hidden 64, 2 layers, nothing downloaded), and the PEFT adapters its tests load.

Each family keeps what makes it differ from Llama: GPT-2's Conv1D and fused c_attn, GPT-NeoX's
partial rotary and parallel residual, Falcon's old (multi-query, one layer norm) and new (grouped
KV, two layer norms) decoders, Phi's partial rotary, Gemma's scaled embeddings, the MoE routers.
Windows are set past the tiny models' positions here; the window tests set their own.
"""

from __future__ import annotations

import copy
import functools

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 512  # prompts are token ids: the tokenizer's text is never needed, so the head stays small
MAX_POSITIONS = 256
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=MAX_POSITIONS,
    initializer_range=0.2,  # greedy argmaxes separated by far more than float noise
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
# family -> (model_type, its config fields beyond COMMON)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "qwen3_moe": ("qwen3_moe", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)),
    "qwen2_moe": (
        "qwen2_moe",
        dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    ),
    "olmoe": ("olmoe", dict(num_experts=4, num_experts_per_tok=2)),
    "flex_olmo": ("flex_olmo", dict(num_experts=4, num_experts_per_tok=2)),
    "glm4_moe": (
        "glm4_moe",
        dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, first_k_dense_replace=0, head_dim=16),
    ),
    "ernie4_5_moe": ("ernie4_5_moe", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=32)),
    "gemma": ("gemma", dict(head_dim=16)),
    # caps small enough to bend the tiny model's scores and logits (defaults: 50 and 30)
    "gemma2": ("gemma2", dict(head_dim=16, attn_logit_softcapping=5.0, final_logit_softcapping=5.0)),
    "gemma3": ("gemma3_text", dict(head_dim=16)),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "starcoder2": ("starcoder2", {}),
    "cohere": ("cohere", {}),
    "internlm3": ("internlm3", dict(head_dim=16)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS)),
    "gpt_neox": ("gpt_neox", dict(rotary_pct=0.25)),
    "gptj": ("gptj", dict(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, rotary_dim=8)),
    "falcon": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2)),
    "falcon_old": ("falcon", dict(new_decoder_architecture=False, multi_query=True)),
    "stablelm": ("stablelm", {}),
}
# Their adapters here target attention and dense linears only; tests/engine/test_moe_experts.py adds
# their experts and routers (PEFT's target_parameters).
MOE = frozenset({"mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "flex_olmo", "glm4_moe", "ernie4_5_moe"})
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@functools.cache
def pristine(family: str) -> torch.nn.Module:
    """The family's tiny model, seeded; never changed in place (deepcopy it, as `model` does)."""
    return build(family)


def model(family: str, **overrides) -> torch.nn.Module:
    """A private copy of the family's model (the engine wraps its model in place); `overrides`:
    config fields on top (a window, the tokenizer's vocabulary), the same weights where shapes agree."""
    return build(family, **overrides) if overrides else copy.deepcopy(pristine(family))


def build(family: str, **overrides) -> torch.nn.Module:
    model_type, fields = FAMILIES[family]
    config = AutoConfig.for_model(model_type, **{**COMMON, **fields, **overrides})
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(config).eval()


def adapter_kwargs(family: str) -> dict[str, dict]:
    """name -> PEFT LoraConfig kwargs: two adapters on every linear layer but the head (attention
    only for MoE families), ranks and scalings apart, one with rsLoRA."""
    targets = ATTENTION if family in MOE else "all-linear"
    extra = dict(fan_in_fan_out=True) if family == "gpt2" else {}  # GPT-2's Conv1D layout
    return {
        "a": dict(r=8, lora_alpha=16, target_modules=targets, **extra),
        "b": dict(r=4, lora_alpha=8, target_modules=targets, use_rslora=True, **extra),
    }
