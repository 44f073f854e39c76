"""JSON bodies parsed off the event loop, strictly: the routers' route class.

FastAPI parses a JSON body with `await request.json()` on the event loop before the route runs, so
one client's multi-megabyte body would stall every stream for as long as `json.loads` takes. The
routes here get a Request whose `json()` parses a large body on a worker thread instead (a small one
inline, where the hop would cost more than the parse). The parser is pydantic-core's (jiter), not the
standard library's: it refuses what `json.loads` lets through to fail later as a 500, a lone UTF-16
surrogate (`"\\ud800"`, which no UTF-8 text can hold) and nesting past its recursion limit, and
reports where. Its errors reach FastAPI as a JSONDecodeError, which becomes a 400 naming them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from fastapi import Request, Response
from fastapi.routing import APIRoute

INLINE_PARSE_BYTES = 64 * 1024  # parsed on the loop below this: well under a millisecond


def parse_json(body: bytes) -> Any:
    """The body's JSON value; invalid JSON (lone surrogates and nesting too deep included) raises a
    JSONDecodeError carrying the parser's message."""
    try:
        return pydantic_core.from_json(body)
    except ValueError as exc:
        raise json.JSONDecodeError(str(exc), "", 0) from None


class OffLoopJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = (
                parse_json(body) if len(body) < INLINE_PARSE_BYTES else await asyncio.to_thread(parse_json, body)
            )
        return self._json


class OffLoopJSONRoute(APIRoute):
    """An APIRoute whose endpoint sees an OffLoopJSONRequest (FastAPI's documented way to change
    how a route reads its body)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            return await handler(OffLoopJSONRequest(request.scope, request.receive))

        return handle
