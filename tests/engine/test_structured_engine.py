"""Structured output in the engine, on the tiny random model: grammars constrain only their own rows,
in a step shared with free rows on other adapters; a finished grammar ends its request; bad specs are
typed errors naming their field; a spec compiles once."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from server.engine.errors import RequestError
from server.engine.grammar import GrammarSpec
from server.engine.sampling_params import SamplingParams
from support.engine import PROMPTS, make_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}


def json_spec(schema: dict) -> GrammarSpec:
    return GrammarSpec(kind="json_schema", source=json.dumps(schema), field="response_format")


def sampled(seed: int, grammar: GrammarSpec | None = None, max_tokens: int = 96) -> SamplingParams:
    return SamplingParams(temperature=0.9, seed=seed, max_tokens=max_tokens, grammar=grammar)


def test_constrained_and_free_rows_on_different_adapters_share_steps(adapter_paths):
    engine = make_engine(adapter_paths)
    steps = []
    engine.step_listeners.append(steps.append)
    adapters = [None, "a", "b", None, "a", "b"]
    params = [sampled(s, json_spec(SCHEMA) if s % 2 == 0 else None) for s in range(6)]
    completions = engine.generate(PROMPTS[:3] * 2, params, adapters)
    assert max(step.num_seqs for step in steps) == 6 and steps[0].num_distinct_adapters == 2
    for seed, completion in enumerate(completions):
        if seed % 2 == 0:
            assert completion.finish_reason == "stop", completion.text
            jsonschema.validate(json.loads(completion.text), SCHEMA)
            assert "\n" not in completion.text


def test_free_rows_are_unchanged_by_constrained_neighbours(adapter_paths):
    """A seeded free row gives the same tokens alone as beside constrained rows."""
    free = [sampled(7, max_tokens=12), sampled(8, max_tokens=12)]
    alone = make_engine(adapter_paths).generate(PROMPTS[:2], free, [None, "a"])
    mixed = make_engine(adapter_paths).generate(
        PROMPTS[:2] * 2, free + [sampled(1, json_spec(SCHEMA))] * 2, [None, "a", "b", None]
    )
    assert [c.token_ids for c in mixed[:2]] == [c.token_ids for c in alone]


def test_json_object_is_compact_and_ends_the_request():
    engine = make_engine()
    spec = json_spec({"type": "object"})
    completions = engine.generate(PROMPTS, [sampled(s, spec, max_tokens=200) for s in range(len(PROMPTS))])
    for completion in completions:
        if completion.finish_reason == "stop":  # a random model may still run out of tokens in a string
            assert isinstance(json.loads(completion.text), dict)
            assert completion.text == json.dumps(json.loads(completion.text), separators=(",", ":"), ensure_ascii=False)
    assert any(c.finish_reason == "stop" for c in completions)


def test_regex_and_choice():
    engine = make_engine()
    regex = GrammarSpec(kind="regex", source=r"[0-9]{3}-[a-z]{2,4}")
    choice = GrammarSpec(kind="lark", source='start: "positive" | "negative" | "neutral"')
    completions = engine.generate(PROMPTS[:2] * 2, [sampled(s, regex if s < 2 else choice) for s in range(4)])
    for completion in completions[:2]:
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", completion.text), completion.text
    for completion in completions[2:]:
        assert completion.text in {"positive", "negative", "neutral"}
        assert completion.finish_reason == "stop"


def test_greedy_constrained_row():
    engine = make_engine()
    spec = GrammarSpec(kind="lark", source='start: "yes" | "no"')
    (completion,) = engine.generate([PROMPTS[0]], [SamplingParams(temperature=0.0, max_tokens=10, grammar=spec)])
    assert completion.text in {"yes", "no"} and completion.finish_reason == "stop"


@pytest.mark.parametrize(
    "spec, message",
    [
        (GrammarSpec(kind="regex", source="[a-", field="structured_outputs.regex"), "unclosed"),
        (GrammarSpec(kind="json_schema", source='{"type": "objekt"}', field="response_format"), "objekt"),
        (GrammarSpec(kind="json_schema", source='{"type": "string", "format": "zzz"}', field="response_format"), "zzz"),
        (GrammarSpec(kind="lark", source="start: nowhere", field="structured_outputs.grammar"), "nowhere"),
    ],
)
def test_bad_spec_is_a_request_error_naming_its_field(spec, message):
    engine = make_engine()
    with pytest.raises(RequestError, match=message) as caught:
        engine.add_request(PROMPTS[0], SamplingParams(grammar=spec))
    assert caught.value.field == spec.field
    assert not engine.has_unfinished()


def test_a_spec_compiles_once():
    engine = make_engine()
    spec = json_spec(SCHEMA)
    engine.generate(PROMPTS[:2], [sampled(1, spec, 8), sampled(2, spec, 8)])
    engine.generate(PROMPTS[:1], [sampled(3, json_spec(SCHEMA), 8)])  # an equal spec, a new object
    assert engine.grammars.num_compiled == 1


def test_free_steps_fill_no_masks():
    engine = make_engine()
    assert engine.mask_filler.start({}) is None
    engine.generate(PROMPTS[:2], [sampled(1, max_tokens=4)] * 2)
    assert engine.grammars.num_compiled == 0


def test_json_rows_close_within_their_budget():
    """The random model would wander; in the last quarter of max_tokens a JSON row closes what is open."""
    engine = make_engine()
    schema = {
        "type": "object",
        "properties": {"note": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["note", "tags"],
    }
    specs = [json_spec({"type": "object"}), json_spec(schema)]
    completions = engine.generate(PROMPTS * 2, [sampled(s, specs[s % 2], max_tokens=40) for s in range(8)])
    for seed, completion in enumerate(completions):
        assert completion.finish_reason == "stop", completion.text
        value = json.loads(completion.text)
        if seed % 2:
            jsonschema.validate(value, schema)
