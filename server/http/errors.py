"""Every error leaves as OpenAI's shape: {"error": {"message", "type", "code", "param"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import (
    AdapterCapacityError,
    AdapterError,
    AdapterExistsError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    LoraServeError,
    UnsupportedAdapterError,
)
from server.engine.errors import (
    EngineDeadError,
    EngineFailedError,
    EngineStoppedError,
    NonFiniteOutputError,
    QueueFullError,
    RequestError,
)
from server.sources import AdapterTooLargeError, SourceUnavailableError, UnusableSourceAdapterError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    499: "client_closed_request",
    503: "service_unavailable",
    500: "internal_server_error",
}

# The one table of typed errors: class -> (HTTP status, OpenAI `code`). A class not listed takes
# its nearest listed base's entry, so every subclass of LoraServeError has one.
_STATUS_AND_CODE: dict[type[LoraServeError], tuple[int, str]] = {
    LoraServeError: (400, "invalid_request_error"),
    AdapterError: (400, "invalid_adapter"),
    IncompatibleAdapterError: (422, "incompatible_adapter"),
    UnsupportedAdapterError: (422, "unsupported_adapter"),
    AdapterNotFoundError: (404, "model_not_found"),  # OpenAI's code for an unknown `model`
    AdapterExistsError: (409, "adapter_exists"),
    AdapterCapacityError: (503, "adapter_capacity"),
    UnusableSourceAdapterError: (422, "invalid_adapter"),  # found in a source, then refused by validation
    AdapterTooLargeError: (413, "too_large"),
    SourceUnavailableError: (503, "adapter_source_unavailable"),
    RequestError: (400, "invalid_request_error"),
    NonFiniteOutputError: (422, "non_finite_output"),
    QueueFullError: (503, "server_overloaded"),
    EngineStoppedError: (503, "server_shutting_down"),
    EngineFailedError: (500, "engine_error"),
    EngineDeadError: (503, "engine_dead"),
}


class HTTPError(Exception):
    """An error raised by a route itself, with its status and OpenAI `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


class ClientDisconnectedError(Exception):
    """The client closed the connection before its response was ready; its requests were aborted."""


def error_response(
    status: int,
    message: str,
    code: str | int | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(_body(status, message, code, param), status_code=status, headers=headers)


def _body(status: int, message: str, code: str | int | None, param: str | None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPES.get(status, "invalid_request_error"),
            "code": code if code is not None else status,
            "param": param,
        }
    }


def status_and_code(exc: LoraServeError) -> tuple[int, str]:
    """The HTTP status and OpenAI `code` a typed error leaves as."""
    return next(_STATUS_AND_CODE[cls] for cls in type(exc).__mro__ if cls in _STATUS_AND_CODE)


def _typed(exc: LoraServeError) -> tuple[int, str, str | int, str | None]:
    """(status, message, code, param) of a typed error from the engine or the adapter core."""
    status, code = status_and_code(exc)
    return status, str(exc), code, exc.field


def error_body(exc: LoraServeError) -> dict:
    """OpenAI's error object for a typed error: what a stream's error event carries."""
    return _body(*_typed(exc))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(LoraServeError)
    async def _typed_error(request: Request, exc: LoraServeError):
        if isinstance(exc, EngineFailedError):
            log.error("engine failure on %s %s: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": "1"} if isinstance(exc, (QueueFullError, SourceUnavailableError)) else None
        status, message, code, param = _typed(exc)
        return error_response(status, message, code, param, headers=_closing(status, headers))

    @app.exception_handler(ClientDisconnectedError)
    async def _client_gone(request: Request, exc: ClientDisconnectedError):
        log.info("client disconnected from %s %s; its requests were aborted", request.method, request.url.path)
        return error_response(499, str(exc), "client_disconnected")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":  # json_body.py's parser names what is wrong and where
            return error_response(400, f"the body is not valid JSON: {first['ctx']['error']}", "invalid_json")
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return error_response(400, f"{param or 'request'}: {first['msg']}", "invalid_request", param or None)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "internal_error", headers=_closing(500))


def _closing(status: int, headers: dict[str, str] | None = None) -> dict[str, str] | None:
    """A 5xx from a fault closes its connection, and says so: uvicorn drops a keep-alive connection
    after an unhandled error, and a client (or a pooling proxy) that was not told would send the next
    request, perhaps another user's, onto a dead socket."""
    if status < 500 or status == 503:
        return headers
    return {**(headers or {}), "Connection": "close"}
