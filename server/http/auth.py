"""Bearer-key checks: an API key for every /v1 route, an optional admin key for adapter changes.

The same check runs twice: in the edge middleware (body_limit.py) from the headers alone, before a
byte of the body is read, so a client without a key cannot make the server read, hold or parse
anything; and in each route's dependency, which also tells the admin routes from the others."""

from __future__ import annotations

import secrets

from fastapi import Request

from .errors import HTTPError

ADMIN_ROUTES = frozenset({"/v1/adapters", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"})  # POST


def presented_key(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, or None."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def key_error(authorization: str, *keys: str | None) -> HTTPError | None:
    """The 401 for a request that presents none of `keys` (None when one matches or none is set)."""
    wanted = [k for k in keys if k]
    if not wanted:
        return None
    presented = presented_key(authorization)
    if presented is None:
        return HTTPError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            "missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not any(secrets.compare_digest(presented.encode(), k.encode()) for k in wanted):
        return HTTPError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return None


def body_keys(settings, method: str, path: str) -> tuple[str | None, ...]:
    """The keys a request must present before its body is read: the same as its route's
    dependencies below ask for (the admin key on the routes that change adapters)."""
    if not path.startswith("/v1/"):
        return ()
    if path in ADMIN_ROUTES or method == "DELETE":
        return (settings.admin_key or settings.api_key,)
    return (settings.api_key, settings.admin_key) if settings.api_key else ()


def _check(request: Request, *keys: str | None) -> None:
    error = key_error(request.headers.get("authorization", ""), *keys)
    if error is not None:
        raise error


async def require_api_key(request: Request) -> None:
    """Any configured key works for reading and generating (the admin key too)."""
    settings = request.app.state.settings
    if settings.api_key:
        _check(request, settings.api_key, settings.admin_key)


async def require_admin_key(request: Request) -> None:
    """Upload, load, unload and delete need the admin key when one is set, else the API key."""
    settings = request.app.state.settings
    _check(request, settings.admin_key or settings.api_key)


async def require_metrics_key(request: Request) -> None:
    settings = request.app.state.settings
    if settings.metrics_require_key:
        _check(request, settings.api_key, settings.admin_key)
