"""Fixtures used by more than one test folder: tiny random base models built from a config, the real
default model, PEFT adapters with non-zero B for both. Nothing here touches a model hub; the plain
helpers behind these live in tests/support."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import random
from pathlib import Path

import torch

# Without CUDA the Triton kernels (adapters/lora_kernels.py, server/engine/row_attention.py) run in
# Triton's interpreter; triton reads the switch when it defines each kernel, so it is set before
# anything (transformers, peft) imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Each server a test starts would compile its decode step (server/engine/compiled_step.py, about a
# minute for the real model); the compiled path has its own tests, which ask for it.
os.environ.setdefault("LORASERVE_COMPILE_DECODE", "off")

import pytest  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from support.peft import make_peft_adapter  # noqa: E402

VOCAB = 128
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if ctypes.util.find_library("c") else None

# The models here are tiny: with more than one thread each small matmul pays an OpenMP hand-off, and
# on a busy 2-core machine the spinning threads made the suite ~20x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def _give_memory_back():
    """After each module, hand the memory its servers and models freed back to the system. glibc
    keeps large freed blocks in its heap (its mmap threshold grows as big blocks are freed), so
    without this every module's server (~1.5 GB with the default model) stayed resident until the
    end, and the suite's peak grew with the number of modules past what CI's 24 GiB holds."""
    yield
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


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
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return _build(LlamaForCausalLM, config)


@pytest.fixture(scope="session")
def tiny_gpt2() -> GPT2LMHeadModel:
    """A pristine 2-layer random GPT-2: its projections are transformers Conv1D ([in, out] weights)."""
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return _build(GPT2LMHeadModel, config)


@pytest.fixture(scope="session")
def default_model():
    """The real default base (SmolLM2-135M-Instruct) as a `server.model_loader.BaseModel`; read-only."""
    from server.engine.model_loader import load_base_model

    return load_base_model()


@pytest.fixture(scope="session", name="make_peft_adapter")
def _make_peft_adapter():
    return make_peft_adapter


@pytest.fixture(scope="session")
def token_ids():
    """[4, 6] token ids shared by the tiny-model tests."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (4, 6), generator=generator)


@pytest.fixture(scope="session")
def tiny_adapter_paths(tmp_path_factory, make_peft_adapter) -> dict[str, Path]:
    from support.engine import write_tiny_adapters  # here, so a test that needs no engine never imports one

    return write_tiny_adapters(tmp_path_factory.mktemp("engine-adapters"), make_peft_adapter)


@pytest.fixture
def adapter_paths(tiny_adapter_paths) -> dict[str, Path]:
    """name -> directory of PEFT adapters "a" and "b" for the engine tests' tiny Llama (written once
    per session); a copy per test, so a test may add its own."""
    return dict(tiny_adapter_paths)


@pytest.fixture(scope="session")
def adapter_dirs(tmp_path_factory, default_model, make_peft_adapter) -> dict[str, Path]:
    """name -> directory of the session's real adapters (alpha, beta, gamma) for the default model."""
    from support.http import write_real_adapters

    return write_real_adapters(tmp_path_factory.mktemp("http-adapters"), default_model.model, make_peft_adapter)


@pytest.fixture(scope="session")
def alpha_server(adapter_dirs):
    """One server, default settings with the adapter `alpha` alone, shared by every module on that
    profile (the OpenAI API, echo/logprobs, lm-eval): their tests only read it and leave it idle."""
    from server.http.settings import Settings
    from support.http import serve

    with serve(Settings(adapters=[f"alpha={adapter_dirs['alpha']}"])) as served:
        yield served


@pytest.fixture(scope="session")
def plain_server():
    """One server on plain default settings (no adapters, no store, no adapter root), shared by the
    modules on that profile (vLLM's load refused without a root, the analysis CLI); a test may upload
    under names it owns and leaves the server idle."""
    from server.http.settings import Settings
    from support.http import serve

    with serve(Settings()) as served:
        yield served
