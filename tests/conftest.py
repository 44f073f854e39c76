"""Shared fixtures: tiny random base models built from a config, the real default model, and a
helper that writes PEFT adapters with non-zero B. Nothing here touches a model hub."""
from __future__ import annotations

import copy
import random
import zlib
from pathlib import Path

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128

# The models here are tiny: with more than one thread each small matmul pays an OpenMP hand-off, and
# on a busy 2-core machine the spinning threads made the suite ~20x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    torch.manual_seed(0)


def _build(model_class, config):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return model_class(config).eval()


@pytest.fixture(scope="session")
def tiny_llama() -> LlamaForCausalLM:
    """A pristine 2-layer random Llama: deepcopy it before wrap_model or PEFT change it in place."""
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _build(LlamaForCausalLM, config)


@pytest.fixture(scope="session")
def tiny_gpt2() -> GPT2LMHeadModel:
    """A pristine 2-layer random GPT-2: its projections are transformers Conv1D ([in, out] weights)."""
    config = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    return _build(GPT2LMHeadModel, config)


@pytest.fixture(scope="session")
def default_model():
    """The real default base (SmolLM2-135M-Instruct) as a `server.model_loader.BaseModel`; read-only."""
    from server.engine.model_loader import load_base_model

    return load_base_model()


def make_peft_adapter(base: torch.nn.Module, path: str | Path, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for `base` (left untouched) to `path`, with random non-zero A and B.

    The weights are seeded by the directory name, so an adapter does not depend on which tests ran first.
    """
    path = Path(path)
    lora_kwargs.setdefault("init_lora_weights", False)  # PEFT's default B is zero: the adapter would be a no-op
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(path.name.encode()))
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_kwargs))
    lora_b = [p for name, p in model.named_parameters() if ".lora_B." in name]
    assert lora_b and all(bool(p.any()) for p in lora_b), "every lora_B must be non-zero"
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session", name="make_peft_adapter")
def _make_peft_adapter():
    return make_peft_adapter


@pytest.fixture(scope="session")
def token_ids():
    """[4, 6] token ids shared by the tiny-model tests."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (4, 6), generator=generator)
