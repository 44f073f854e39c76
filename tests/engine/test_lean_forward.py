"""The lean forward (server/engine/lean_forward.py) against the stock transformers forward.

Two engines on copies of one model run the same requests, one through the lean pass and one through
`model(...)`, through prefill chunks, decode, gather steps mixing adapters and base rows, and merged
steps. Unfused (plain kernels), every step's logits are identical (torch.equal). Fused (packed q/k/v
and gate/up as one matmul each), they agree within the measured packed-vs-plain kernel noise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from adapters import wrap_model
from adapters.kernels import PACKED, PLAIN, KernelPlan
from server.engine.config import EngineConfig
from server.engine.lean_forward import lean_forward
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import BaseModel
from support.engine import MERGE_SOON, encode, fresh_model, greedy, load_tokenizer
from support.http import SAME_KERNELS_ULPS, fp32_tolerance

SMALL = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    initializer_range=0.2,
    eos_token_id=2,
)


def _family_model(name: str) -> torch.nn.Module:
    if name == "llama":
        return fresh_model()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        if name == "mistral":
            return MistralForCausalLM(MistralConfig(**SMALL)).eval()
        return Qwen2ForCausalLM(Qwen2Config(**SMALL)).eval()  # q/k/v carry biases


def _recording_engine(
    model: torch.nn.Module, lean: bool, adapters: dict[str, Path], **config
) -> tuple[LLMEngine, list]:
    engine = LLMEngine(
        BaseModel(model, load_tokenizer(), "tiny", Path("tiny")),
        EngineConfig(enable_prefix_caching=False, **MERGE_SOON | config),
    )
    for name, path in adapters.items():
        engine.registry.add(name, path)
    if not lean:
        engine.runner.lean = None
    logits, forward = [], engine.runner._forward

    def record(*args):
        out = forward(*args)
        logits.append(out.clone())
        return out

    engine.runner._forward = record
    return engine, logits


def _lean_and_stock_runs(family: str, tmp_path: Path, make_peft_adapter, kernel_choice: str) -> list:
    """(per-step logits, tokens, engine) of the lean engine, then of the stock one."""
    model = _family_model(family)
    adapters = {
        "a": make_peft_adapter(model, tmp_path / "a", r=8, lora_alpha=16, target_modules="all-linear"),
        "b": make_peft_adapter(model, tmp_path / "b", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    }
    runs = []
    for lean in (True, False):
        # Small steps: the long prompt is prefilled in chunks that attend to cached rows.
        engine, logits = _recording_engine(
            copy.deepcopy(model), lean, adapters, max_num_batched_tokens=24, kernel_choice=kernel_choice
        )
        assert (engine.runner.lean is not None) == lean
        prompts = [
            encode("Hello there, how are you today my friend") * 4,
            encode("The quick brown fox"),
            encode("1 2 3 4 5"),
            encode("Once upon a time"),
        ]
        mixed = engine.generate(
            prompts, [greedy(6, prompt_logprobs=2), greedy(6), greedy(6), greedy(6)], [None, "a", "b", "a"]
        )
        merged = engine.generate([encode("Merge me in, please")], [greedy(12)], ["b"])  # one adapter: merges
        assert engine.stats().steps_by_mode.get("merged"), "the single-adapter run never merged"
        runs.append((logits, [c.token_ids for c in mixed + merged], engine))
    return runs


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_lean_forward_equals_stock_forward_bitwise(family, tmp_path, make_peft_adapter):
    (lean_logits, lean_tokens, lean), (stock_logits, stock_tokens, _) = _lean_and_stock_runs(
        family, tmp_path, make_peft_adapter, kernel_choice=PLAIN
    )
    assert not lean.runner.lean.fused, "plain kernels are never fused"
    assert lean_tokens == stock_tokens
    assert len(lean_logits) == len(stock_logits)
    for step, (ours, theirs) in enumerate(zip(lean_logits, stock_logits)):
        assert torch.equal(ours, theirs), f"step {step}: max diff {(ours - theirs).abs().max()}"


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_projections_agree_with_the_stock_forward(family, tmp_path, make_peft_adapter):
    (lean_logits, lean_tokens, lean), (stock_logits, stock_tokens, _) = _lean_and_stock_runs(
        family, tmp_path, make_peft_adapter, kernel_choice=PACKED
    )
    if not lean.runner.lean.fused:
        pytest.skip("oneDNN packing is not available on this CPU: nothing is fused")
    assert len(lean.runner.lean.fused) == 2 * 2  # q/k/v and gate/up in each of the 2 layers
    assert lean_tokens == stock_tokens
    # The stock side runs the members' plain (MKL) kernels, the fused side oneDNN's packed one: the
    # bound is what those two kernels differ by on this CPU, measured on the same model, relative to
    # its logits, with a floor of fp32 rounding within one engine.
    noise = _packed_vs_plain_noise(_family_model(family), torch.tensor([encode("Hello there, how are you")]))
    for step, (ours, theirs) in enumerate(zip(lean_logits, stock_logits)):
        scale = theirs.abs().max().item()
        tolerance = max(4 * noise * scale, fp32_tolerance([scale], SAME_KERNELS_ULPS))
        assert (ours - theirs).abs().max() <= tolerance, f"step {step}"


@torch.no_grad()
def _packed_vs_plain_noise(model: torch.nn.Module, ids: torch.Tensor) -> float:
    """Largest logit difference between the base on packed and on plain kernels, relative to the logits."""
    plain = model(ids).logits
    packed = wrap_model(copy.deepcopy(model), kernels=KernelPlan(PACKED)).model(ids).logits
    return ((packed - plain).abs().max() / plain.abs().max()).item()


def test_other_families_keep_the_stock_forward():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4, n_positions=64))
    assert lean_forward(gpt2) is None
    assert lean_forward(fresh_model()) is not None
