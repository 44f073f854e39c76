"""Typed errors a request can trigger in the engine; `status` is the HTTP code they map to."""
from __future__ import annotations


class RequestError(Exception):
    """A request the engine refuses; the message says which field is wrong and why."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, *, field: str | None = None):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


class PromptTooLongError(RequestError):
    """Prompt plus max_tokens does not fit the model's context or the KV cache."""


class QueueFullError(RequestError):
    """Too many requests are waiting; retry later."""

    status = 503
    kind = "server_overloaded"


class EngineStoppedError(RequestError):
    """The engine is shutting down and takes no new requests."""

    status = 503
    kind = "server_shutting_down"


class EngineFailedError(Exception):
    """The engine failed while running a request (a bug or a device error), not the request's fault."""

    status = 500
    kind = "engine_error"


class EngineDeadError(EngineFailedError):
    """The engine thread has stopped for good; the process should be restarted."""

    status = 503
    kind = "engine_dead"
