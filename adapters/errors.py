"""Typed errors for everything a bad adapter file, config or request can trigger.

`LoraServeError` is the one base of every error the server reports to a client (the engine's
request errors subclass it too); the HTTP layer maps each class to its status code in one table
(server/http/errors.py), so nothing here knows HTTP. Each error names the file and the field
(or tensor) at fault, so a user can fix the input without reading our code.
"""

from __future__ import annotations


class LoraServeError(Exception):
    """Base class: an error a client caused or should hear about, naming the `field` at fault."""

    def __init__(self, message: str, *, field: str | None = None):
        self.field, self.detail = field, message
        where = self.where()
        super().__init__(f"{where}: {message}" if where else message)

    def where(self) -> str:
        """What the message is prefixed with: the field at fault, if any."""
        return self.field or ""


class AdapterError(LoraServeError):
    """An adapter could not be read, validated, found or placed."""

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None):
        self.file = file
        super().__init__(message, field=field)

    def where(self) -> str:
        return ": ".join(part for part in (self.file, self.field) if part)


class InvalidAdapterError(AdapterError):
    """The adapter's files are missing, malformed or inconsistent with themselves."""


class UnsafeAdapterFormatError(InvalidAdapterError):
    """The weights are a pickle (adapter_model.bin), which can run code when loaded."""


class IncompatibleAdapterError(AdapterError):
    """The adapter is well formed but does not fit this base model (names or shapes)."""


class UnsupportedAdapterError(AdapterError):
    """The adapter uses a feature loraserve does not serve (DoRA, modules_to_save, rank too high...)."""


class MergeBudgetError(AdapterError):
    """Merging would take more buffer memory than --merge-memory allows: the rows are served gathered."""


class AdapterNotFoundError(AdapterError):
    """No adapter is registered under that name."""


class AdapterExistsError(AdapterError):
    """An adapter is already registered under that name (and replace was not asked for)."""


class AdapterCapacityError(AdapterError):
    """Every device slot is pinned or in use by running requests; retry later."""
