"""Helpers for the engine tests: the real default tokenizer on a tiny random Llama.

The tiny model matches the tokenizer's vocabulary so text round-trips; its init is scaled up
(initializer_range=0.2) so greedy argmaxes are separated by far more than float noise, and the
engine's greedy tokens can be compared with HF/PEFT `generate` token for token.

Expensive objects are cached per process (lru_cache), so the fixtures in conftest.py and the
helpers called directly share one tokenizer and one pristine model.
"""

from __future__ import annotations

import copy
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import BaseModel, resolve_model_dir
from server.engine.sampling_params import SamplingParams

EOS = 2  # the default tokenizer's <|im_end|>
BASE = "__base__"  # PEFT's adapter name for a plain base row
# name -> PEFT LoraConfig kwargs; all non-zero B (support.peft.make_peft_adapter guarantees it)
ADAPTERS = {
    "a": dict(r=8, lora_alpha=16, target_modules="all-linear"),
    "b": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True),
}
# Tests' requests are a few tokens long, too short to repay a merge on the server's default policy
# (merge_min_steps_left=32): engines under test merge them anyway, so the merged path is what they check.
MERGE_SOON = {"merge_min_steps_left": 1}
PROMPTS = ["Hello there, how are you", "The quick brown fox jumps over", "1 2 3 4 5", "Once upon a time"]


@functools.cache
def load_tokenizer():
    """The default model's tokenizer; where that model is not installed (the GPU machine, which gets
    only its config and tokenizer), LORASERVE_TEST_TOKENIZER names a directory holding the same one."""
    return AutoTokenizer.from_pretrained(os.environ.get("LORASERVE_TEST_TOKENIZER") or resolve_model_dir(None)[0])


@functools.cache
def pristine_model() -> LlamaForCausalLM:
    """The tiny model every engine test copies; never changed in place (see fresh_model)."""
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=EOS,
        pad_token_id=EOS,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def fresh_model() -> LlamaForCausalLM:
    """A private copy of the tiny model: the engine wraps its model in place."""
    return copy.deepcopy(pristine_model())


def write_tiny_adapters(root: Path, make_peft_adapter) -> dict[str, Path]:
    """The ADAPTERS for the tiny model, written under `root`."""
    return {name: make_peft_adapter(pristine_model(), root / name, **kwargs) for name, kwargs in ADAPTERS.items()}


def make_engine(adapter_paths: dict[str, Path] | None = None, *, extra_eos: int | None = None, **config) -> LLMEngine:
    """An engine on a fresh tiny model, with `adapter_paths` registered; `extra_eos` is one more
    end-of-sequence id in the model's generation config (as many chat models list several)."""
    model = fresh_model()
    if extra_eos is not None:
        model.generation_config.eos_token_id = [EOS, extra_eos]
    engine = LLMEngine(BaseModel(model, load_tokenizer(), "tiny", Path("tiny")), EngineConfig(**MERGE_SOON | config))
    for name, path in (adapter_paths or {}).items():
        engine.registry.add(name, path)
    return engine


def greedy(max_tokens: int = 8, **fields) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **fields)


def encode(prompt: str) -> list[int]:
    return load_tokenizer().encode(prompt)


def peft_reference(adapter_paths: dict[str, Path]) -> PeftModel:
    """PEFT on a copy of the same tiny model, every adapter loaded."""
    (first, first_path), *rest = adapter_paths.items()
    model = PeftModel.from_pretrained(fresh_model(), str(first_path), adapter_name=first)
    for name, path in rest:
        model.load_adapter(str(path), adapter_name=name)
    return model.eval()


@torch.no_grad()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, adapter: str | None = None) -> list[int]:
    """Greedy tokens from HF `generate`, EOS neither stopping nor suppressed (as with ignore_eos)."""
    ids = torch.tensor([prompt_ids])
    kwargs = {"adapter_names": [adapter or BASE]} if isinstance(model, PeftModel) else {}
    # generate fills an unset eos_token_id from the model's own generation config: clear it there too
    (model.get_base_model() if isinstance(model, PeftModel) else model).generation_config.eos_token_id = None
    config = GenerationConfig(eos_token_id=None, pad_token_id=EOS, do_sample=False, max_new_tokens=max_new_tokens)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **kwargs)
    tokens = out[0, ids.shape[1] :].tolist()
    assert len(tokens) == max_new_tokens, "the reference stopped early"
    return tokens


@torch.no_grad()
def hf_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain HF forward: [len(token_ids), V]."""
    return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].float(), -1)


def run_steps(engine: LLMEngine, max_steps: int = 1000) -> dict[str, list]:
    """Step until idle; every request id's outputs, in order. Fails if it does not finish."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished():
            return outputs
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError(f"engine still busy after {max_steps} steps")


@contextmanager
def listening(engine: LLMEngine, listener: Callable[[object], None]) -> Iterator[None]:
    """`listener` hears every engine step and every finished request (on the engine thread) inside
    the block. The lists are replaced, not changed in place, as the engine thread may be iterating them."""
    engine.step_listeners = [*engine.step_listeners, listener]
    engine.request_listeners = [*engine.request_listeners, listener]
    try:
        yield
    finally:
        engine.step_listeners = [f for f in engine.step_listeners if f is not listener]
        engine.request_listeners = [f for f in engine.request_listeners if f is not listener]


def wait_for_engine(
    engine: LLMEngine, condition: Callable[[], bool], timeout: float = 60.0, what: str = "the condition"
) -> None:
    """Until `condition()` holds: checked now, then on the engine thread after each step and each
    finished request, so a change is seen the moment the engine makes it. Bounded by `timeout`."""
    holds = threading.Event()

    def check(_stats) -> None:
        if condition():
            holds.set()

    with listening(engine, check):
        if not condition() and not holds.wait(timeout):
            raise AssertionError(f"{what} did not happen within {timeout} s")


def assert_released(engine: LLMEngine) -> None:
    """Nothing left behind: no KV reserved, no adapter held."""
    assert not engine.has_unfinished()
    assert engine.stats().kv_reserved_tokens == 0
    assert engine.cache.extents == {}
    assert engine.registry.held() == {}


# Fault injection: what a device error or a bug in the loop would do, on a real engine
def break_loop_when_busy(engine: LLMEngine) -> None:
    """The engine loop itself raises (SystemExit, which no step handler catches) once a request runs."""
    publish = engine.publish_stats

    def die_once_busy():
        if engine.has_unfinished():
            raise SystemExit("injected: the engine loop breaks")
        publish()

    engine.publish_stats = die_once_busy
