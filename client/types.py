"""Response types of the loraserve API (OpenAI's shapes); unknown fields are kept, not rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Model):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(_Model):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: dict | None = None


class Completion(_Model):
    id: str
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text if self.choices else ""


class ChatMessage(_Model):
    role: str
    content: str | None = None


class ChatChoice(_Model):
    index: int
    message: ChatMessage
    finish_reason: str | None = None
    logprobs: dict | None = None


class ChatCompletion(_Model):
    id: str
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None

    @property
    def text(self) -> str:
        return (self.choices[0].message.content or "") if self.choices else ""


class StreamDelta(_Model):
    """One server-sent event of a streamed completion or chat, flattened to what callers need."""

    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


class ModelInfo(_Model):
    id: str
    parent: str | None = None
    rank: int | None = None
    target_modules: list[str] | None = None
    compose: list[dict] | None = None  # a named composition's [{"name", "scale"}, ...]


class AdapterInfo(_Model):
    """An adapter as GET /v1/adapters reports it. The server's model (server/http/api_models.py
    `AdapterCard`) is derived from its registry; a test checks that the two have the same fields."""

    name: str
    rank: int
    target_modules: list[str]
    num_bytes: int
    pinned: bool
    slot: int | None = None
    in_host_memory: bool
    persisted: bool
    compression: dict | None = None  # params_before, params_after, energy_kept: when the upload compressed it
    resolved_from: str | None = None  # the adapter source URI the server resolved it from on first use


class AdapterAnalysis(_Model):
    """GET /v1/adapters/{name}/analysis: one dict per targeted module (rank, scale, delta_norm,
    singular_values, effective_rank, amplification) and a summary with warnings."""

    name: str
    layers: list[dict]
    summary: dict


class AdapterSimilarity(_Model):
    """GET /v1/adapters/{name}/similarity: φ per module both adapters target, and its mean."""

    name: str
    other: str
    layers: list[dict]
    mean: float | None = None
