"""What a step consumes is checked before it runs, and what one request's rows do stays with them:
a composition whose merge would overflow the dtype is served gathered, never a failed step."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import safetensors.torch

from server.engine.adapter_ref import AdapterRef
from server.engine.config import EngineConfig
from server.engine.errors import NonFiniteOutputError, RequestError
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import BaseModel
from support.engine import MERGE_SOON, PROMPTS, encode, fresh_model, greedy, load_tokenizer

FLOAT16_MAX = 65504.0


def _half_engine(adapter_paths, tmp_path) -> LLMEngine:
    base = BaseModel(fresh_model().half(), load_tokenizer(), "tiny", Path("tiny"))
    engine = LLMEngine(base, EngineConfig(merge_after_steps=1, kernel_choice="plain", **MERGE_SOON))
    engine.registry.add("loud", _louder(adapter_paths["a"], tmp_path / "loud"))
    return engine


def _louder(source: Path, target: Path, factor: float = 1000.0) -> Path:
    """The same adapter with B x `factor`: a valid adapter whose ΔW x fp16's largest scale overflows."""
    shutil.copytree(source, target)
    weights = target / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    safetensors.torch.save_file({k: v * factor if ".lora_B." in k else v for k, v in tensors.items()}, str(weights))
    return target


def test_a_composition_whose_merge_overflows_is_served_gathered(adapter_paths, tmp_path):
    engine = _half_engine(adapter_paths, tmp_path)
    overflowing = engine.add_request(encode(PROMPTS[0]), greedy(6), AdapterRef.composed((("loud", FLOAT16_MAX),)))
    beside = engine.add_request(encode(PROMPTS[1]), greedy(6))
    while engine.has_unfinished():
        engine.step()  # a merge failure used to raise out of the step, failing every request in it
    # Gathered, its fp16 activations overflow too: it fails alone, with a typed error, and the base row goes on.
    assert overflowing.finish_reason == "abort" and isinstance(overflowing.error, NonFiniteOutputError)
    assert (beside.finish_reason, beside.error) == ("length", None)
    assert engine.counters.steps_by_mode.get("merged", 0) == 0


def test_scales_past_the_dtype_and_token_ids_past_the_vocabulary_are_refused(adapter_paths, tmp_path):
    engine = _half_engine(adapter_paths, tmp_path)
    with pytest.raises(RequestError) as refused:
        engine.add_request(encode(PROMPTS[0]), greedy(2), AdapterRef.composed((("loud", FLOAT16_MAX * 2),)))
    assert refused.value.field == "adapters[0].scale"
    with pytest.raises(RequestError) as refused:
        engine.add_request(encode(PROMPTS[0]), greedy(2, logit_bias={engine.vocab_size: 1.0}))
    assert refused.value.field == "logit_bias"
    assert not engine.has_unfinished()
