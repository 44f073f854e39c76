"""Python client for loraserve (no torch, no server import): `Client`, `AsyncClient`, typed errors."""

from .client import AsyncClient, Client
from .errors import (
    AuthenticationError,
    BadRequestError,
    ConflictError,
    ConnectionFailed,
    LoraserveError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServerBusyError,
    parse_error,
)
from .types import AdapterInfo, ChatCompletion, Completion, ModelInfo, StreamDelta, Usage

__all__ = [
    "AdapterInfo",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "ChatCompletion",
    "Client",
    "Completion",
    "ConflictError",
    "ConnectionFailed",
    "LoraserveError",
    "ModelInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ServerBusyError",
    "StreamDelta",
    "Usage",
    "parse_error",
]
