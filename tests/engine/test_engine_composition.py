"""Per-request compositions in the engine: rows with different adapter sets and scales share one
forward pass with plain and base rows, and give PEFT's tokens with those adapters active at those
scales (PEFT's `set_adapter([...])` with `set_scale`)."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer

from adapters import AdapterNotFoundError
from server.engine.adapter_ref import AdapterRef
from server.engine.errors import RequestError
from support.engine import PROMPTS, assert_released, encode, greedy, hf_greedy, make_engine, peft_reference

TWO = (("a", 0.5), ("b", 1.0))
THREE_LIKE = (("a", 0.7), ("b", -0.5))
ONE = (("b", -0.5),)


def record_steps(engine):
    steps = []
    engine.step_listeners.append(steps.append)
    return steps


@torch.no_grad()
def peft_composed_greedy(model, prompt_ids, max_new_tokens, composition) -> list[int]:
    names = [name for name, _ in composition]
    model.base_model.set_adapter(names)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        for name, scale in composition:
            if name in layer.scaling:
                layer.set_scale(name, scale)
    try:
        return hf_greedy(model.base_model.model, prompt_ids, max_new_tokens)  # the injected HF model: active set
    finally:
        for layer in layers:
            for name in names:
                if name in layer.scaling:
                    layer.set_scale(name, 1.0)


def test_composed_rows_share_a_step_with_plain_and_base_rows_and_match_peft(adapter_paths):
    requests = [
        (PROMPTS[0], None),
        (PROMPTS[0], "a"),
        (PROMPTS[0], TWO),
        (PROMPTS[0], THREE_LIKE),
        (PROMPTS[1], ONE),
        (PROMPTS[2], TWO),
        (PROMPTS[3], "b"),
    ]
    engine = make_engine(adapter_paths)
    steps = record_steps(engine)
    completions = engine.generate([p for p, _ in requests], [greedy(8)] * len(requests), [a for _, a in requests])
    assert steps[0].mode == "gather"
    reference = peft_reference(adapter_paths)
    for (prompt, adapter), completion in zip(requests, completions):
        if isinstance(adapter, tuple):
            expected = peft_composed_greedy(reference, encode(prompt), 8, adapter)
        else:
            expected = hf_greedy(reference, encode(prompt), 8, adapter)
        assert completion.token_ids == expected, (prompt, adapter)
    same_prompt = [tuple(c.token_ids) for c in completions[:4]]
    assert len(set(same_prompt)) == 4, "each composition must change the output, or the test proves nothing"
    assert_released(engine)


def test_a_composition_alone_merges_and_gives_the_gathered_tokens(adapter_paths):
    engine = make_engine(adapter_paths, merge_after_steps=2)
    steps = record_steps(engine)
    (merged,) = engine.generate([PROMPTS[1]], greedy(8), [TWO])
    assert [s.mode for s in steps] == ["gather"] + ["merged"] * 7
    (gathered,) = make_engine(adapter_paths, merge_after_steps=1000).generate([PROMPTS[1]], greedy(8), [TWO])
    assert merged.token_ids == gathered.token_ids
    assert merged.token_ids == peft_composed_greedy(peft_reference(adapter_paths), encode(PROMPTS[1]), 8, TWO)
    assert_released(engine)


def test_unknown_adapter_in_a_composition_is_refused_and_binds_nothing(adapter_paths):
    engine = make_engine(adapter_paths)
    with pytest.raises(AdapterNotFoundError):
        engine.add_request(PROMPTS[0], greedy(4), AdapterRef.composed((("a", 1.0), ("nope", 0.5))))
    assert not engine.has_unfinished()
    engine.registry.remove("a")  # would fail its unbind accounting if the failed request had kept "a" bound
    assert "a" not in engine.registry


@pytest.mark.parametrize(
    "composition, field",
    [((), "adapters"), ((("a", float("nan")),), "adapters[0].scale"), ((("a", 1.0), ("b", 1.0)) * 3, "adapters")],
)
def test_bad_compositions_are_refused_by_field(adapter_paths, composition, field):
    engine = make_engine(adapter_paths, max_loras=4)
    with pytest.raises(RequestError) as caught:
        engine.add_request(PROMPTS[0], greedy(4), AdapterRef.composed(composition))
    assert caught.value.field == field
    assert engine.registry.held() == {} and not engine.has_unfinished()
