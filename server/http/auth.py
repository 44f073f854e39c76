"""Bearer-key checks: an API key for every /v1 route, an optional admin key for adapter changes."""

from __future__ import annotations

import secrets

from fastapi import Request

from .errors import HTTPError


def _presented_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _check(request: Request, *keys: str | None) -> None:
    wanted = [k for k in keys if k]
    if not wanted:
        return
    presented = _presented_key(request)
    if presented is None:
        raise HTTPError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            "missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not any(secrets.compare_digest(presented.encode(), k.encode()) for k in wanted):
        raise HTTPError(401, "invalid API key", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


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
