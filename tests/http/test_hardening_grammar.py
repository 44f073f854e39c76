"""Structured output cannot crash or poison the server, through real HTTP on the real default model.

Each attack the review found (a 3,000-link $ref chain and a 3,000-rule Lark chain that segfaulted
llguidance in the server's own process, a regex whose lexer blows up after its first token, 20,001
choices, JSON nested thousands deep in a schema string or in an earlier tool call's arguments) is a
4xx naming the field and the limit's setting, and afterwards the server gives the same greedy text
as before. GBNF grammars and tool_choice "required" with a pydantic nested model are served.
"""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from support.http import BASE, assert_openai_error
from support.tool_models import Trip

pytestmark = pytest.mark.real_model

PROMPT = "The capital of France is"


def ref_chain(links: int) -> dict:
    defs = {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(links)}
    defs[f"d{links}"] = {"type": "string"}
    return {"$ref": "#/$defs/d0", "$defs": defs}


LARK_CHAIN = "start: r0\n" + "".join(f"r{i}: r{i + 1}\n" for i in range(3000)) + 'r3000: "x"\n'
DEEP_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}


def chat(**fields) -> tuple[str, dict]:
    return "chat/completions", {
        "model": BASE,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 8,
        **fields,
    }


def completion(**fields) -> tuple[str, dict]:
    return "completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 8, **fields}


ATTACKS = {
    "ref-chain": (
        chat(response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": ref_chain(3000)}}),
        "response_format.json_schema.schema",
        "max_grammar_rules",
    ),
    "lark-chain": (
        completion(structured_outputs={"grammar": LARK_CHAIN}),
        "structured_outputs.grammar",
        "max_grammar_rules",
    ),
    "crash-inside-limits": (  # %json hides the chain from the rule count: the worker crashes, not the server
        completion(structured_outputs={"grammar": "start: %json " + json.dumps(ref_chain(3000))}),
        "structured_outputs.grammar",
        "the compiler crashed on it",
    ),
    "choices": (
        completion(structured_outputs={"choice": [f"c{i}" for i in range(20_001)]}),
        "structured_outputs.choice",
        "max_choices",
    ),
    "json-string-depth": (
        completion(structured_outputs={"json": "[" * 3000 + "]" * 3000}),
        "structured_outputs.json",
        "max_json_depth",
    ),
    "tool-call-arguments-depth": (
        chat(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "tool_calls": [DEEP_CALL]}]),
        "messages[1].tool_calls[0].function.arguments",
        "max_json_depth",
    ),
}


@pytest.fixture(scope="module")
def served(plain_server):
    return plain_server


@pytest.fixture(scope="module")
def greedy_before(served) -> str:
    """The greedy text of a plain request before any attack; every test expects it after its own."""
    return greedy(served)


def greedy(served) -> str:
    path, body = completion(temperature=0.0)
    response = post(served, path, body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def post(served, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{served.url}/v1/{path}", json=body, timeout=120)


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_an_attack_is_a_400_naming_its_field_and_limit(served, greedy_before, attack):
    (path, body), field, words = ATTACKS[attack]
    error = assert_openai_error(post(served, path, body), 400, words)
    assert error["param"] == field
    assert greedy(served) == greedy_before


def test_a_lexer_blowup_is_a_400_every_time_never_a_cached_empty_answer(served, greedy_before):
    """Its first mask fits; its first token needs more lexer work than a step may do. Before, the
    first request was a 500 carrying llguidance's state and the second a 200 with text ""."""
    path, body = completion(structured_outputs={"regex": "(a{1000}){1000}"})
    for _ in range(2):
        error = assert_openai_error(post(served, path, body), 400, "lexer work", "max_grammar_step_fuel")
        assert error["param"] == "structured_outputs.regex" and "non-verbose" not in error["message"]
    assert greedy(served) == greedy_before


def test_gbnf_is_served(served):
    path, body = completion(structured_outputs={"grammar": 'root ::= "yes" | "no"'}, temperature=0.0)
    response = post(served, path, body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["text"] in {"yes", "no"} and choice["finish_reason"] == "stop"


def test_required_tool_calls_with_a_pydantic_nested_model(served):
    schema = Trip.model_json_schema()  # City is a $def that the properties $ref
    tools = [{"type": "function", "function": {"name": "plan_trip", "parameters": schema}}]
    messages = [{"role": "user", "content": "Plan a trip from Oslo to Rome."}]
    path, body = chat(messages=messages, tools=tools, tool_choice="required", max_tokens=100, temperature=0.0)
    response = post(served, path, body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    for call in choice["message"]["tool_calls"]:
        assert call["function"]["name"] == "plan_trip"
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
