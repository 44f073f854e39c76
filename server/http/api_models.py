"""OpenAI-compatible request and response bodies (plus vLLM's extra sampling fields)."""

from __future__ import annotations

import dataclasses
import re
import time
import typing
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model, field_validator

from adapters import AdapterInfo
from server.engine.errors import RequestError
from server.engine.grammar import GrammarSpec
from server.engine.sampling_params import SamplingParams


class _Request(BaseModel):
    # Unknown fields are ignored, as vLLM does, so any OpenAI client version works unchanged. No
    # number may be infinite or NaN: every float a request carries reaches arithmetic.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


TokenId = StrictInt  # a JSON integer only: never true/false, 1.0 or "1"
INT64 = 2**63  # seeds are what torch.Generator.manual_seed takes: signed 64-bit
_TOKEN_ID_KEY = re.compile(r"-?[0-9]{1,12}")  # ASCII digits: str.isdigit() also takes "²" and "٣"


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str = Field("response", pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the answer always follows the schema, strict or not


class ResponseFormat(_Request):
    """OpenAI's response_format: free text, any JSON object, or JSON valid against a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` extra (since 0.12; it replaced guided_json/regex/choice/grammar).

    Exactly one kind; a field we cannot honour (whitespace_pattern, structural_tag...) is refused."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None  # Lark (llguidance's syntax), or GBNF (converted)
    json_object: bool | None = None


class AdapterTerm(_Request):
    """One adapter of a per-request composition (loraserve's `adapters` extension field)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    scale: float = Field(1.0, allow_inf_nan=False)  # any finite number, negative included


class ComposeRequest(_Request):
    """POST /v1/adapters as JSON: name a composition of registered adapters."""

    model_config = ConfigDict(extra="forbid")

    name: str
    compose: list[AdapterTerm] = Field(min_length=1)
    replace: bool = False


class _SamplingFields(_Request):
    model: str
    # loraserve's extension: Σ scaleᵢ·ΔWᵢ of these adapters on the base (`model` then names the base)
    adapters: list[AdapterTerm] | None = Field(None, min_length=1)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1)
    ignore_eos: bool | None = None
    # Bounded both ways: logits are divided or multiplied by it, and past these they overflow.
    repetition_penalty: float | None = Field(None, ge=0.01, le=100.0)
    stop_token_ids: list[TokenId] | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    min_tokens: int | None = Field(None, ge=0)
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias in [-100, 100]
    # Known sampling fields loraserve does not serve: refused by name unless neutral (UNSERVED_FIELDS)
    best_of: int | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    include_stop_str_in_output: bool | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[TokenId] | None = None
    truncate_prompt_tokens: int | None = None
    logits_processors: Any = None
    cache_salt: str | None = Field(None, min_length=1)  # shares cached prefixes only with the same salt
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's guided_* fields were removed in 0.12: refused with a pointer, never quietly ignored
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None

    def sampling_params(
        self,
        max_tokens: int | None,
        logprobs: int | None,
        choice: int,
        prompt_logprobs: int | None = None,
        grammar: GrammarSpec | None = None,
    ) -> SamplingParams:
        self.refuse_unserved()
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        # n choices must differ; wrapped, so a seed near the top of the range stays a valid one
        seed = None if self.seed is None else (self.seed + choice + INT64) % (2 * INT64) - INT64
        return SamplingParams.make(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            stop=stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
            cache_salt=self.cache_salt,
            min_p=self.min_p,
            min_tokens=self.min_tokens,
            logit_bias=self.token_biases(),
        )

    def refuse_unserved(self) -> None:
        """A sampling field set to what it cannot mean here is a 400 naming it, never ignored."""
        if self.best_of is not None and self.best_of != self.n:
            raise RequestError(
                f"best_of={self.best_of} is not served: each choice is sampled once (use n)", field="best_of"
            )
        for name, neutral in UNSERVED_FIELDS.items():
            if getattr(self, name, None) not in (None, neutral):
                raise RequestError("is not supported by this server", field=name)

    def token_biases(self) -> dict[int, float] | None:
        """logit_bias with integer token ids; bounded as OpenAI bounds it."""
        if not self.logit_bias:
            return None
        biases = {}
        for key, bias in self.logit_bias.items():
            if not _TOKEN_ID_KEY.fullmatch(key):
                raise RequestError(f"keys must be token ids, not {key[:40]!r}", field="logit_bias")
            if not -100.0 <= bias <= 100.0:
                raise RequestError(f"bias {bias} of token {key} is outside [-100, 100]", field="logit_bias")
            biases[int(key)] = bias
        return biases


# Fields of OpenAI's or vLLM's requests that loraserve does not serve, with the value that asks for
# nothing (also accepted): any other value is refused by name.
UNSERVED_FIELDS = {
    "use_beam_search": False,
    "length_penalty": 1.0,
    "include_stop_str_in_output": False,
    "bad_words": [],
    "allowed_token_ids": None,
    "truncate_prompt_tokens": None,
    "logits_processors": None,
    "suffix": None,
}


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[TokenId] | list[list[TokenId]]
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: score the prompt (lm-eval does)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # OpenAI's insertion suffix: refused (UNSERVED_FIELDS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, prompt):
        """One message for every wrong shape (the union's own would name a branch per member)."""
        if isinstance(prompt, str) or _is_list_of(prompt, str) or _is_token_ids(prompt):
            return prompt
        if isinstance(prompt, list) and all(_is_token_ids(p) for p in prompt):
            return prompt
        raise ValueError("must be a string, a list of strings, a list of token ids (JSON integers) or a list of those")


def _is_list_of(value, kind: type) -> bool:
    return isinstance(value, list) and all(type(v) is kind for v in value)


def _is_token_ids(value) -> bool:
    return _is_list_of(value, int)  # type(True) is bool, not int: booleans are no token ids


class ContentPart(_Request):
    """One part of a message's content: only text parts are served (limits.py refuses the others by
    name, e.g. an image on this text-only base)."""

    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str  # the arguments object as JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text or "" for part in self.content if part.type == "text")
        return self.content or ""


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # arguments always follow the schema, strict or not


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # false: at most one call
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call: the first carries id, type and name; the rest arguments."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "loraserve"
    parent: str | None = None  # vLLM's convention: an adapter's parent is the base model's id
    root: str | None = None
    rank: int | None = None
    target_modules: list[str] | None = None
    compose: list[AdapterTerm] | None = None  # a named composition's adapters and scales


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Compression(BaseModel):
    """What rank compression on upload kept: parameters before and after, and the fraction of
    the update's energy (Σσ² over all layers) kept."""

    rank_before: int
    params_before: int
    params_after: int
    energy_kept: float


def _fields_of(info: type, exclude: set[str]) -> type[BaseModel]:
    """A pydantic model with the fields of the dataclass `info` (types and defaults), so the API
    reports what the registry knows without a second list to keep in step."""
    hints = typing.get_type_hints(info)
    fields = {
        f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(info)
        if f.name not in exclude
    }
    return create_model(f"_{info.__name__}Fields", **fields)


class AdapterCard(_fields_of(AdapterInfo, exclude={"source"})):  # source: a path on this server
    """An adapter as the management API reports it: the registry's `AdapterInfo`, plus what only
    the server knows. The client's copy (client/types.py) is tested against this one."""

    persisted: bool
    compression: Compression | None = None  # set by an upload that asked for energy or max_rank
    resolved_from: str | None = None  # the --adapter-source URI this process resolved it from on first use

    @classmethod
    def of(cls, info: AdapterInfo, persisted: bool, resolved_from: str | None = None) -> AdapterCard:
        shared = {f.name: getattr(info, f.name) for f in dataclasses.fields(info) if f.name in cls.model_fields}
        return cls(**shared, persisted=persisted, resolved_from=resolved_from)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterCard]


class LoadLoraRequest(_Request):
    lora_name: str
    lora_path: str
    # Rank compression, as on upload: each layer at min(max_rank, its effective rank at energy).
    energy: float | None = Field(None, gt=0.0, le=1.0)
    max_rank: int | None = Field(None, ge=1)


class UnloadLoraRequest(_Request):
    lora_name: str


class ErrorBody(BaseModel):
    message: str
    type: str
    code: int | str | None = None
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
