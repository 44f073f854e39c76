"""Every typed error keeps the HTTP status and OpenAI `code` it had when each class carried its own."""

from __future__ import annotations

import pytest

from adapters.errors import (
    AdapterCapacityError,
    AdapterExistsError,
    AdapterNotFoundError,
    IncompatibleAdapterError,
    InvalidAdapterError,
    LoraServeError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
)
from server.engine.errors import (
    EngineDeadError,
    EngineFailedError,
    EngineStoppedError,
    PromptTooLongError,
    QueueFullError,
    RequestError,
)
from server.http.errors import error_body, status_and_code


@pytest.mark.parametrize(
    "error, status, code",
    [
        (InvalidAdapterError, 400, "invalid_adapter"),
        (UnsafeAdapterFormatError, 400, "invalid_adapter"),
        (IncompatibleAdapterError, 422, "incompatible_adapter"),
        (UnsupportedAdapterError, 422, "unsupported_adapter"),
        (AdapterNotFoundError, 404, "model_not_found"),
        (AdapterExistsError, 409, "adapter_exists"),
        (AdapterCapacityError, 503, "adapter_capacity"),
        (RequestError, 400, "invalid_request_error"),
        (PromptTooLongError, 400, "invalid_request_error"),
        (QueueFullError, 503, "server_overloaded"),
        (EngineStoppedError, 503, "server_shutting_down"),
        (EngineFailedError, 500, "engine_error"),
        (EngineDeadError, 503, "engine_dead"),
    ],
)
def test_each_typed_error_maps_to_its_status_and_code(error, status, code):
    assert issubclass(error, LoraServeError)
    assert status_and_code(error("bad")) == (status, code)


def test_messages_name_the_file_and_field():
    assert str(RequestError("must not be empty", field="prompt")) == "prompt: must not be empty"
    assert str(EngineFailedError("boom")) == "boom"
    adapter = InvalidAdapterError("is missing", file="adapter_model.safetensors", field="lora_A")
    assert str(adapter) == "adapter_model.safetensors: lora_A: is missing"
    assert (adapter.detail, adapter.field, adapter.file) == ("is missing", "lora_A", "adapter_model.safetensors")
    assert error_body(adapter)["error"] == {
        "message": str(adapter),
        "type": "invalid_request_error",
        "code": "invalid_adapter",
        "param": "lora_A",
    }
