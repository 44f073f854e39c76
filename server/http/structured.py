"""Structured output and tool calls, HTTP side: request fields -> one grammar (answers -> tool calls
is tool_calls.py).

`chat_plan` and `completion_plan` read OpenAI's `response_format`, vLLM's `structured_outputs`, and
`tools` with `tool_choice`, check them (every error names its field, every limit its setting), and
compile the grammar on the calling worker thread, so a bad schema is a 400 before any work is queued.
Every JSON text parsed here (a schema given as a string, an earlier tool call's arguments) is
bounded in depth (max_json_depth) below where Python's recursive parser would fail.

Tool calls are constrained, not parsed from free text: `required` makes the answer a JSON array of
`{"name", "arguments"}` objects, one per call, each valid against its function's parameters; a
named function makes the answer that function's arguments object. `auto` would need the model to
choose between text and a call in its own syntax, which the default model's template does not
render: it is refused (docs/structured-output.md).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass

from llguidance.gbnf_to_lark import gbnf_to_lark

from server.engine.errors import RequestError
from server.engine.grammar import GrammarCompiler, GrammarSpec
from server.engine.grammar_check import GrammarLimits, GrammarRefused, check_depth, check_size, load_json

from .api_models import (
    ChatCompletionRequest,
    ChatMessage,
    StructuredOutputs,
)
from .tool_calls import ToolMode

# JSON Schema keywords the grammar enforces; anything else would be silently ignored: refused.
ENFORCED = {
    "type",
    "properties",
    "required",
    "additionalProperties",
    "items",
    "prefixItems",
    "minItems",
    "maxItems",
    "enum",
    "const",
    "anyOf",
    "oneOf",
    "allOf",
    "$ref",
    "$defs",
    "definitions",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minLength",
    "maxLength",
    "pattern",
    "format",
}
ANNOTATIONS = {
    "title",
    "description",
    "default",
    "examples",
    "$schema",
    "$id",
    "$comment",
    "deprecated",
    "readOnly",
    "writeOnly",
    "discriminator",
    "nullable",
}
_SCHEMA_MAPS = {"properties", "$defs", "definitions"}  # name -> schema
_SCHEMA_LISTS = {"prefixItems", "anyOf", "oneOf", "allOf"}


@dataclass(frozen=True)
class OutputPlan:
    grammar: GrammarSpec | None = None
    tools: ToolMode | None = None


def chat_plan(body: ChatCompletionRequest, grammars: GrammarCompiler) -> OutputPlan:
    """The chat request's constraint, checked and compiled (run on a worker thread). The earlier tool
    calls in its messages are checked here too, before `template_messages` parses them."""
    limits = grammars.limits
    _check_tool_call_arguments(body.messages, limits)
    tools, formats = _tool_plan(body, limits), _format_grammar(body, limits)
    if tools.grammar is not None and formats is not None:
        raise RequestError(f"cannot be combined with {formats.field}", field="tool_choice")
    plan = tools if tools.grammar is not None else OutputPlan(formats)
    if plan.grammar is not None:
        grammars.compile(plan.grammar)
    return plan


def completion_plan(body, grammars: GrammarCompiler) -> OutputPlan:
    plan = OutputPlan(_format_grammar(body, grammars.limits))
    if plan.grammar is not None:
        grammars.compile(plan.grammar)
    return plan


def check_schema(schema, field: str) -> None:
    """Refuse a keyword the grammar would not enforce, naming where it is (recursive: check its depth first)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise RequestError("a JSON schema must be an object or a boolean", field=field)
    for key, value in schema.items():
        if key not in ENFORCED and key not in ANNOTATIONS:
            raise RequestError(f"the JSON schema keyword {key!r} is not supported", field=f"{field}.{key}")
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_schema(sub, f"{field}.{key}.{name}")
        elif key in _SCHEMA_LISTS and isinstance(value, list) or key == "items" and isinstance(value, list):
            for i, sub in enumerate(value):
                check_schema(sub, f"{field}.{key}[{i}]")
        elif key in ("items", "additionalProperties"):
            check_schema(value, f"{field}.{key}")


def json_grammar(schema: dict, field: str, limits: GrammarLimits) -> GrammarSpec:
    _checked_schema(schema, field, limits)
    return GrammarSpec(kind="json_schema", source=json.dumps(schema, sort_keys=False), field=field)


def _checked_schema(schema, field: str, limits: GrammarLimits) -> None:
    with _refused_as(field):
        check_depth(schema, limits.max_json_depth)
    check_schema(schema, field)


def _loaded_json(text: str, field: str, limits: GrammarLimits):
    with _refused_as(field):
        try:
            return load_json(text, limits.max_json_depth)
        except ValueError as exc:
            raise RequestError(f"is not valid JSON: {exc}", field=field) from None


@contextmanager
def _refused_as(field: str):
    """A limit's GrammarRefused as the 400 it is, naming the request field."""
    try:
        yield
    except GrammarRefused as exc:
        raise RequestError(str(exc), field=field) from None


def _format_grammar(body, limits: GrammarLimits) -> GrammarSpec | None:
    for old in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(body, old) is not None:
            raise RequestError(
                f"was removed in vLLM 0.12: use structured_outputs.{old.removeprefix('guided_')}", field=old
            )
    formats = body.response_format
    grammar = None
    if formats is not None and formats.type == "json_object":
        grammar = json_grammar({"type": "object"}, "response_format", limits)
    elif formats is not None and formats.type == "json_schema":
        if formats.json_schema is None:
            raise RequestError("is required when type is json_schema", field="response_format.json_schema")
        schema = formats.json_schema.schema_ if formats.json_schema.schema_ is not None else {"type": "object"}
        grammar = json_grammar(schema, "response_format.json_schema.schema", limits)
    if body.structured_outputs is not None:
        if grammar is not None:
            raise RequestError("cannot be combined with response_format", field="structured_outputs")
        grammar = _structured_outputs_grammar(body.structured_outputs, limits)
    return grammar


def _structured_outputs_grammar(options: StructuredOutputs, limits: GrammarLimits) -> GrammarSpec:
    kinds = [k for k in ("json_", "regex", "choice", "grammar", "json_object") if getattr(options, k)]
    if len(kinds) != 1:
        raise RequestError("give exactly one of json, regex, choice, grammar, json_object", field="structured_outputs")
    field = f"structured_outputs.{kinds[0].rstrip('_')}"
    if options.json_ is not None:
        schema = options.json_
        if isinstance(schema, str):
            schema = _loaded_json(schema, field, limits)
        return json_grammar(schema, field, limits)
    if options.json_object:
        return json_grammar({"type": "object"}, field, limits)
    if options.regex is not None:
        return GrammarSpec(kind="regex", source=options.regex, field=field)
    if options.choice is not None:
        return GrammarSpec(kind="lark", source=_choice_grammar(options.choice, field, limits), field=field)
    return GrammarSpec(kind="lark", source=_lark(options.grammar, field, limits), field=field)


def _choice_grammar(choices: list[str], field: str, limits: GrammarLimits) -> str:
    """One terminal of alternatives (JSON string literals are valid Lark literals): the lexer matches
    them as one regex, where as alternatives of a rule they would be one parser item each (llguidance
    refuses a rule with more than 2,000 of those at one point)."""
    if len(choices) > limits.max_choices:
        raise RequestError(
            f"{len(choices)} choices, more than the limit of {limits.max_choices} (setting max_choices)", field=field
        )
    return "start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _lark(grammar: str, field: str, limits: GrammarLimits) -> str:
    """A Lark grammar, or a GBNF one (llama.cpp's, xgrammar's) converted to Lark by llguidance."""
    if "::=" not in grammar:
        return grammar
    with _refused_as(field):
        check_size(grammar, limits)  # before converting: the converter's time grows with it
    try:
        return gbnf_to_lark(grammar)
    except RecursionError:
        raise RequestError("the GBNF grammar nests too deeply to convert", field=field) from None
    except Exception as exc:  # noqa: BLE001 - any converter failure is the grammar's fault
        raise RequestError(f"invalid GBNF grammar: {exc}", field=field) from None


def _check_tool_call_arguments(messages: list[ChatMessage], limits: GrammarLimits) -> None:
    for i, message in enumerate(messages):
        for j, call in enumerate(message.tool_calls or []):
            _loaded_json(call.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments", limits)


def _tool_plan(body: ChatCompletionRequest, limits: GrammarLimits) -> OutputPlan:
    choice, tools = body.tool_choice, body.tools or []
    if not tools:
        if choice not in (None, "none"):
            raise RequestError("needs tools", field="tool_choice")
        return OutputPlan()
    parameters: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        if tool.function.name in parameters:
            raise RequestError(f"{tool.function.name!r} is defined twice", field=f"tools[{i}].function.name")
        schema = tool.function.parameters if tool.function.parameters is not None else {"type": "object"}
        _checked_schema(schema, f"tools[{i}].function.parameters", limits)
        parameters[tool.function.name] = schema
    if choice == "none":
        return OutputPlan()
    if body.stop or body.stop_token_ids:  # a stop inside the call's JSON would leave it unparseable
        field = "stop" if body.stop else "stop_token_ids"
        raise RequestError(
            "cannot be combined with tool calls: a stop inside a call would cut its JSON "
            "arguments; the call's grammar already ends it",
            field=field,
        )
    if choice in (None, "auto"):
        raise RequestError(
            "'auto' (the default with tools) is not supported: the model's chat template does "
            "not render tools, so it cannot choose to call one; use 'required', a named "
            "function, or 'none'",
            field="tool_choice",
        )
    if choice == "required":
        array = _calls_schema(parameters)
        if body.parallel_tool_calls is False:
            array["maxItems"] = 1
        return OutputPlan(GrammarSpec(kind="json_schema", source=json.dumps(array), field="tools"), ToolMode(None))
    name = choice.function.name
    if name not in parameters:
        raise RequestError(f"no tool is named {name!r}", field="tool_choice.function.name")
    spec = GrammarSpec(
        kind="json_schema",
        source=json.dumps(parameters[name]),
        field=f"tools[{list(parameters).index(name)}].function.parameters",
    )
    return OutputPlan(spec, ToolMode(name))


def _calls_schema(parameters: dict[str, dict]) -> dict:
    """tool_choice "required": a JSON array of {"name", "arguments"} calls. Each tool's schema moves
    whole, with its own $defs, to $defs/tool{i} of the top-level schema, and its local $refs are
    rewritten to point there: nested inside a call object, "#/$defs/City" would be looked up in the
    array's schema, not the tool's. So any tool works as it does under a named tool_choice."""
    defs, calls = {}, []
    for i, (name, schema) in enumerate(parameters.items()):
        defs[f"tool{i}"] = _rebased(schema, f"#/$defs/tool{i}")
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/tool{i}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return {"type": "array", "items": {"anyOf": calls}, "minItems": 1, "$defs": defs}


def _rebased(schema, base: str):
    """A copy of a tool's schema (checked: enforced keywords only, depth bounded) whose local $refs
    ("#", "#/...") point under `base` instead of its root. `$id` is dropped: it would move the base."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            out[key] = base + value[1:]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rebased(sub, base) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS | {"items"} and isinstance(value, list):
            out[key] = [_rebased(sub, base) for sub in value]
        elif key in ("items", "additionalProperties"):
            out[key] = _rebased(value, base)
        elif key != "$id":
            out[key] = value
    return out
