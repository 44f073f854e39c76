"""Typed client errors, one per failure a caller handles differently; `parse_error` picks one."""

from __future__ import annotations

import httpx


class LoraserveError(Exception):
    """The server answered with an error (or could not be reached)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        code: str | int | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.message, self.status, self.type, self.code, self.param = message, status, type, code, param


class ConnectionFailed(LoraserveError):
    """No HTTP answer: the server is down, unreachable, or the connection broke."""


class BadRequestError(LoraserveError):
    """400/422: the request (or the adapter files) is invalid; the message says what and where."""


class AuthenticationError(LoraserveError):
    """401: missing or wrong API key."""


class PermissionDeniedError(LoraserveError):
    """403: the server does not allow this (e.g. loading adapters by path is disabled)."""


class NotFoundError(LoraserveError):
    """404: no such model or adapter."""


class ConflictError(LoraserveError):
    """409: an adapter with that name already exists."""


class PayloadTooLargeError(LoraserveError):
    """413: the upload is over the server's limit."""


class ServerBusyError(LoraserveError):
    """503: queue full, model still loading, or shutting down; retry after `retry_after` seconds."""

    retry_after: float | None = None


_BY_STATUS = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    422: BadRequestError,
    503: ServerBusyError,
}


def parse_error(response: httpx.Response) -> LoraserveError:
    """Turn an error response (OpenAI's {"error": {...}} shape) into the matching exception."""
    try:
        body = response.json().get("error", {})
    except ValueError:
        body = {"message": response.text or response.reason_phrase}
    if not isinstance(body, dict):
        body = {"message": str(body)}
    error_class = _BY_STATUS.get(response.status_code, LoraserveError)
    error = error_class(
        body.get("message") or f"HTTP {response.status_code}",
        status=response.status_code,
        type=body.get("type"),
        code=body.get("code"),
        param=body.get("param"),
    )
    if isinstance(error, ServerBusyError) and response.headers.get("retry-after", "").isdigit():
        error.retry_after = float(response.headers["retry-after"])
    return error
