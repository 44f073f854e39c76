"""The edge of every request with a body: its key, then its size and time, before any route sees it.

The key is checked from the headers first (auth.py): a client without one gets its 401 and the
connection is closed before a byte of its body is read, so keyless clients can neither hold memory
nor make the server read or parse anything. Then a JSON body is read here whole, up to
`max_request_bytes`, within `request_read_timeout`, and replayed to the app (whose routes parse it
off the event loop: json_body.py): FastAPI parses bodies before a route runs and turns any error
raised while reading into a 400, so the limit cannot live in the routes. A Content-Length over the
limit is refused before a byte of the body is read. Adapter uploads (multipart) stream past this to
their route, which counts bytes against `max_upload_bytes`; here they only get an idle timeout per
chunk, since a large upload may rightly take long. Every refusal closes the connection (the rest of
the body is never read).
"""

from __future__ import annotations

import asyncio
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import body_keys, key_error
from .errors import HTTPError, error_response

METHODS_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})
FALLBACK_LIMIT = 1 << 20  # before the model has loaded, when the prompt-byte limit is not known yet
UPLOAD_PATH = "/v1/adapters"


class BodyLimit:
    """Pure ASGI middleware: 413 past the byte limit, 408 past the read timeout."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in METHODS_WITH_BODY:
            return await self.app(scope, receive, send)
        settings = scope["app"].state.settings
        unauthorised = key_error(_header(scope, b"authorization"), *body_keys(settings, scope["method"], scope["path"]))
        if unauthorised is not None:
            return await _refuse(unauthorised, scope, receive, send)
        timeout = settings.request_read_timeout
        if _is_upload(scope):
            return await self.app(scope, _idle_bounded(receive, timeout), send)
        limit = request_byte_limit(scope["app"])
        declared = _content_length(scope)
        try:
            if declared is not None and declared > limit:
                raise _too_large(limit)
            body = await _read_body(receive, limit, timeout)
        except HTTPError as exc:
            return await _refuse(exc, scope, receive, send)
        await self.app(scope, _replay(body, receive), send)


async def _refuse(exc: HTTPError, scope: Scope, receive: Receive, send: Send) -> None:
    """The error, and the connection closed: the rest of the body is never read."""
    headers = {**(exc.headers or {}), "Connection": "close"}
    await error_response(exc.status, exc.message, exc.code, headers=headers)(scope, receive, send)


def request_byte_limit(app) -> int:
    """`max_request_bytes`, or by default room for the longest prompt the model can take, JSON-escaped
    (\\uXXXX makes up to 3 bytes of each UTF-8 byte), plus 1 MiB for the other fields."""
    settings = app.state.settings
    if settings.max_request_bytes is not None:
        return settings.max_request_bytes
    limits = getattr(app.state.server, "limits", None)
    return FALLBACK_LIMIT if limits is None else 4 * limits.max_prompt_bytes + (1 << 20)


async def _read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    chunks, size, deadline = [], 0, time.monotonic() + timeout
    while True:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
        except TimeoutError:
            raise HTTPError(
                408,
                f"the request body did not arrive within {timeout:g} s (setting request_read_timeout)",
                "request_timeout",
            ) from None
        if message["type"] == "http.disconnect":
            raise HTTPError(400, "the client disconnected while sending the body", "client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the client's own messages (a disconnect still reaches streaming routes)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def _idle_bounded(receive: Receive, timeout: float) -> Receive:
    """Each chunk of the body within `timeout`; once the body is in, the client's messages unbounded."""
    body_done = False

    async def bounded() -> Message:
        nonlocal body_done
        if body_done:
            return await receive()
        try:
            message = await asyncio.wait_for(receive(), timeout)
        except TimeoutError:
            raise HTTPError(
                408,
                f"no part of the upload arrived for {timeout:g} s (setting request_read_timeout)",
                "request_timeout",
            ) from None
        body_done = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return bounded


def _header(scope: Scope, name: bytes) -> str:
    """A header's value as text (latin-1, as HTTP carries it); empty if absent."""
    return dict(scope["headers"]).get(name, b"").decode("latin-1")


def _is_upload(scope: Scope) -> bool:
    return scope["path"] == UPLOAD_PATH and _header(scope, b"content-type").startswith("multipart/")


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value.isascii() and value.isdigit() else None


def _too_large(limit: int) -> HTTPError:
    return HTTPError(
        413, f"the request body is larger than the limit of {limit} bytes (setting max_request_bytes)", "too_large"
    )
