"""Every error leaves as OpenAI's shape: {"error": {"message", "type", "code", "param"}}."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters import AdapterError
from server.engine.errors import EngineFailedError, QueueFullError, RequestError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 409: "conflict_error", 413: "request_too_large",
          422: "invalid_request_error", 499: "client_closed_request", 503: "service_unavailable",
          500: "internal_server_error"}


class HTTPError(Exception):
    """An error raised by a route itself, with its status and OpenAI `code`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


class ClientDisconnectedError(Exception):
    """The client closed the connection before its response was ready; its requests were aborted."""


def error_response(status: int, message: str, code: str | int | None = None, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(_body(status, message, code, param), status_code=status, headers=headers)


def _body(status: int, message: str, code: str | int | None, param: str | None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "code": code if code is not None else status, "param": param}}


def _typed(exc: AdapterError | RequestError | EngineFailedError) -> tuple[int, str, str | int, str | None]:
    """(status, message, code, param) of a typed error from the engine or the adapter core."""
    if isinstance(exc, AdapterError):
        return exc.status, str(exc), "model_not_found" if exc.status == 404 else exc.kind, exc.field
    return exc.status, str(exc), exc.kind, getattr(exc, "field", None)


def error_body(exc: AdapterError | RequestError | EngineFailedError) -> dict:
    """OpenAI's error object for a typed error: what a stream's error event carries."""
    return _body(*_typed(exc))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error_response(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(AdapterError)
    @app.exception_handler(RequestError)
    @app.exception_handler(EngineFailedError)
    async def _typed_error(request: Request, exc: AdapterError | RequestError | EngineFailedError):
        if isinstance(exc, EngineFailedError):
            log.error("engine failure on %s %s: %s", request.method, request.url.path, exc)
        headers = {"Retry-After": "1"} if isinstance(exc, QueueFullError) else None
        return error_response(*_typed(exc), headers=headers)

    @app.exception_handler(ClientDisconnectedError)
    async def _client_gone(request: Request, exc: ClientDisconnectedError):
        log.info("client disconnected from %s %s; its requests were aborted", request.method, request.url.path)
        return error_response(499, str(exc), "client_disconnected")

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path"))
        return error_response(400, f"{param or 'request'}: {first['msg']}", "invalid_request", param or None)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", "internal_error")
