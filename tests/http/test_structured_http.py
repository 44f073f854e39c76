"""Structured output and tool calls through the official `openai` client, on the real default model.

Requests for the base and two adapters run concurrently (one batch), sampled at temperature 0.9 with
seeds: every json_schema answer validates, every json_object answer parses, every required or named
tool call has schema-valid arguments and finish_reason "tool_calls", and a stream concatenates to
the same kind of valid JSON. Bad schemas, unsupported keywords and unknown tools are 400s naming the
field, and nothing reaches the engine.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from support.http import BASE, assert_openai_error, wait_idle

pytestmark = pytest.mark.real_model

MODELS = [BASE, "alpha", "beta"]
SAMPLED = dict(temperature=0.9, max_tokens=200)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 2, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 20}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in (WEATHER, TIME)}


class Person(BaseModel):
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def served(default_server):
    return default_server  # one server per settings profile (tests/http/conftest.py)


@pytest.fixture(scope="module")
def client(served):
    with openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=300) as client:
        yield client


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def concurrently(calls) -> list:
    """Run the calls at once, so their requests share the engine's steps."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def test_schema_object_and_tool_answers_in_one_mixed_batch(client, served):
    steps = []
    served.engine.step_listeners.append(steps.append)

    def schema(model, seed):
        return lambda: client.chat.completions.create(
            model=model,
            messages=ask("Describe a user as JSON."),
            seed=seed,
            **SAMPLED,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "person", "schema": PERSON, "strict": True},
            },
        )

    def json_object(model, seed):
        return lambda: client.chat.completions.create(
            model=model,
            messages=ask("Give me a JSON object about cats."),
            seed=seed,
            **SAMPLED,
            response_format={"type": "json_object"},
        )

    def tools(model, seed, choice):
        return lambda: client.chat.completions.create(
            model=model,
            messages=ask("What is the weather in Paris?"),
            seed=seed,
            tools=[WEATHER, TIME],
            tool_choice=choice,
            **SAMPLED,
        )

    named = {"type": "function", "function": {"name": "get_time"}}
    calls = (
        [schema(m, s) for m in MODELS for s in (1, 2)]
        + [json_object(m, 3) for m in MODELS]
        + [tools(m, 4, "required") for m in MODELS]
        + [tools(m, 5, named) for m in MODELS]
    )
    responses = concurrently(calls)
    served.engine.step_listeners.remove(steps.append)
    assert max(step.num_seqs for step in steps) > 3 and max(step.num_distinct_adapters for step in steps) == 2

    for response in responses[:6]:
        (choice,) = response.choices
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    for response in responses[6:9]:
        assert isinstance(json.loads(response.choices[0].message.content), dict)
    for response in responses[9:]:
        (choice,) = response.choices
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert all(r.choices[0].message.tool_calls[0].function.name == "get_time" for r in responses[12:])


def test_streamed_json_concatenates_to_valid_json(client):
    stream = client.chat.completions.create(
        model="alpha",
        messages=ask("Describe a user as JSON."),
        seed=7,
        stream=True,
        **SAMPLED,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls(client, choice):
    stream = client.chat.completions.create(
        model="beta",
        messages=ask("Weather in Oslo?"),
        seed=8,
        stream=True,
        tools=[WEATHER, TIME],
        tool_choice=choice,
        **SAMPLED,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        assert not delta.content
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = call["id"] or piece.id
            call["name"] = call["name"] or piece.function.name
            call["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and calls
    for call in calls.values():
        assert call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_sdk_parse_into_a_pydantic_model(client):
    completion = client.chat.completions.parse(
        model="alpha", messages=ask("A person, as JSON."), seed=3, response_format=Person, **SAMPLED
    )
    assert isinstance(completion.choices[0].message.parsed, Person)


def test_tool_result_round_trip(client):
    first = client.chat.completions.create(
        model=BASE, messages=ask("Weather in Rome?"), seed=1, tools=[WEATHER], tool_choice="required", **SAMPLED
    )
    message = first.choices[0].message
    call = message.tool_calls[0]
    messages = ask("Weather in Rome?") + [
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    second = client.chat.completions.create(
        model=BASE, messages=messages, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=16
    )
    assert second.choices[0].message.content and second.choices[0].finish_reason in {"stop", "length"}


def test_regex_choice_and_completions(client):
    regex = client.chat.completions.create(
        model="alpha",
        messages=ask("A date?"),
        seed=1,
        **SAMPLED,
        extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}},
    )
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", regex.choices[0].message.content)
    choice = client.chat.completions.create(
        model="beta",
        messages=ask("Is this good?"),
        seed=2,
        **SAMPLED,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert choice.choices[0].message.content in {"yes", "no"}
    completion = client.completions.create(
        model=BASE,
        prompt="A user record:",
        seed=3,
        **SAMPLED,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}},
    )
    jsonschema.validate(json.loads(completion.choices[0].text), PERSON)


@pytest.mark.parametrize(
    "body, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "schema": {
                            "type": "object",
                            "properties": {"a": {"type": "string", "contentEncoding": "base64"}},
                        },
                    },
                }
            },
            "response_format.json_schema.schema.properties.a.contentEncoding",
        ),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER]}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
                "tool_choice": "required",
            },
            "tools[0].function.parameters.not",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
        ({"guided_regex": "a+"}, "guided_regex"),
        ({"messages": [{"role": "tool", "content": "21"}]}, "messages[0].tool_call_id"),
    ],
)
def test_bad_constraints_are_400_naming_the_field(served, body, param):
    before = served.engine.counters.num_finished
    response = httpx.post(
        f"{served.url}/v1/chat/completions",
        timeout=60,
        json={"model": BASE, "messages": ask("hi"), "max_tokens": 4, **body},
    )
    error = assert_openai_error(response, 400)
    assert error["param"] == param, error
    wait_idle(served)
    assert served.engine.counters.num_finished == before  # nothing was queued
