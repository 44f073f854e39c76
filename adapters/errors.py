"""Typed errors for everything a bad adapter file, config or request can trigger.

Each error names the file and the field (or tensor) at fault, so a user can fix the input
without reading our code. `status` is the HTTP code the server maps the error to.
"""
from __future__ import annotations


class AdapterError(Exception):
    """Base class: an adapter could not be read, validated, found or placed."""

    status = 400
    kind = "invalid_adapter"

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file, self.field, self.detail = file, field, message
        where = ": ".join(part for part in (file, field) if part)
        super().__init__(f"{where}: {message}" if where else message)


class InvalidAdapterError(AdapterError):
    """The adapter's files are missing, malformed or inconsistent with themselves."""


class UnsafeAdapterFormatError(InvalidAdapterError):
    """The weights are a pickle (adapter_model.bin), which can run code when loaded."""


class IncompatibleAdapterError(AdapterError):
    """The adapter is well formed but does not fit this base model (names or shapes)."""

    status = 422
    kind = "incompatible_adapter"


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a feature loraserve does not serve (DoRA, modules_to_save, rank too high...)."""

    status = 422
    kind = "unsupported_adapter"


class AdapterNotFoundError(AdapterError):
    """No adapter is registered under that name."""

    status = 404
    kind = "adapter_not_found"


class AdapterExistsError(AdapterError):
    """An adapter is already registered under that name (and replace was not asked for)."""

    status = 409
    kind = "adapter_exists"


class AdapterCapacityError(AdapterError):
    """Every device slot is pinned or in use by running requests; retry later."""

    status = 503
    kind = "adapter_capacity"
