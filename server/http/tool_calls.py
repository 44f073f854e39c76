"""Tool calls, answer side: a finished or streaming constrained answer -> OpenAI's tool calls, and
earlier calls in a chat's messages -> what the chat template takes. (Which grammar constrains the
answer is structured.py's.)
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from server.engine.errors import RequestError

from .api_models import ChatMessage, FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta


@dataclass(frozen=True)
class ToolMode:
    """How a constrained answer becomes tool calls: one named function's arguments, or an array of calls."""

    function: str | None  # the named function; None: the answer is [{"name", "arguments"}, ...]


def tool_calls(mode: ToolMode, text: str) -> list[ToolCall]:
    """The calls a finished constrained answer holds (`function.arguments` as JSON text)."""
    if mode.function is not None:
        return [new_call(mode.function, text)]
    try:
        return [
            new_call(call["name"], json.dumps(call["arguments"], ensure_ascii=False, separators=(",", ":")))
            for call in json.loads(text)
        ]
    except RecursionError:  # a free-form arguments schema lets the model nest past what Python parses
        raise RequestError("the generated tool calls nest too deeply to split into calls", field="tools") from None


def new_call(name: str, arguments: str) -> ToolCall:
    return ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name=name, arguments=arguments))


def template_messages(messages: list[ChatMessage], renders_tool_calls: bool) -> list[dict]:
    """Messages as the chat template takes them. A template that ignores `tool_calls` (the default
    model's) sees an assistant's calls as the JSON it would have been constrained to write."""
    out = []
    for i, message in enumerate(messages):
        entry = {"role": message.role, "content": message.text()}
        if message.role == "tool":
            if not message.tool_call_id:
                raise RequestError("is required in a tool message", field=f"messages[{i}].tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            calls = [
                {"name": c.function.name, "arguments": _arguments(c.function.arguments, i, j)}
                for j, c in enumerate(message.tool_calls)
            ]
            if renders_tool_calls:
                entry["tool_calls"] = [
                    {"id": c.id, "type": "function", "function": call} for c, call in zip(message.tool_calls, calls)
                ]
            else:
                entry["content"] += json.dumps(calls, ensure_ascii=False, separators=(",", ":"))
        out.append(entry)
    return out


def _arguments(text: str, i: int, j: int):
    """Parsed arguments (chat_plan bounded their depth already; RecursionError is the backstop)."""
    field = f"messages[{i}].tool_calls[{j}].function.arguments"
    try:
        return json.loads(text)
    except RecursionError:
        raise RequestError("nests too deeply (setting max_json_depth)", field=field) from None
    except ValueError:
        raise RequestError("must be JSON text", field=field) from None


class ToolCallStream:
    """A constrained tool-call answer as OpenAI streams it. A named function's arguments go out as
    they are generated, after a first delta with the call's id and name; an array of calls (tool
    choice "required") goes out once complete, one delta per call."""

    def __init__(self, mode: ToolMode):
        self.mode, self.text = mode, ""

    def start(self) -> list[ToolCallDelta] | None:
        if self.mode.function is None:
            return None
        call = new_call(self.mode.function, "")
        return [
            ToolCallDelta(
                index=0, id=call.id, type="function", function=FunctionCallDelta(name=call.function.name, arguments="")
            )
        ]

    def add(self, text: str, is_complete: bool) -> list[ToolCallDelta] | None:
        self.text += text
        if self.mode.function is not None:
            return [ToolCallDelta(index=0, function=FunctionCallDelta(arguments=text))] if text else None
        if not is_complete:
            return None
        return [
            ToolCallDelta(
                index=i,
                id=call.id,
                type="function",
                function=FunctionCallDelta(name=call.function.name, arguments=call.function.arguments),
            )
            for i, call in enumerate(tool_calls(self.mode, self.text))
        ]
