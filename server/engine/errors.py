"""Typed errors a request can trigger in the engine; server/http/errors.py maps each to its HTTP code."""

from __future__ import annotations

from adapters.errors import LoraServeError


class RequestError(LoraServeError):
    """A request the engine refuses; the message says which field is wrong and why."""


class PromptTooLongError(RequestError):
    """Prompt plus max_tokens does not fit the model's context or the KV cache."""


class QueueFullError(RequestError):
    """Too many requests are waiting; retry later."""


class NonFiniteOutputError(RequestError):
    """The model's logits for this request hold a NaN or an infinity: its adapter's weights, finite
    as checked at load, overflow the activations. The request fails alone; the others in its step go on."""


class EngineStoppedError(RequestError):
    """The engine is shutting down and takes no new requests."""


class EngineFailedError(LoraServeError):
    """The engine failed while running a request (a bug or a device error), not the request's fault."""


class EngineDeadError(EngineFailedError):
    """The engine thread has stopped for good; the process should be restarted."""
