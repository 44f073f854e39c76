"""Property-based fuzzing of every operation in the app's own OpenAPI schema (schemathesis), against
the live server: no input may cause a 5xx, and every 4xx must carry OpenAI's error shape.

Bounded: a few examples per operation, derandomized, and a small context (max_model_len) so a
fuzzed max_tokens or n can never make one example generate for long.
"""

from __future__ import annotations

import zlib

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from server.http.app import create_app
from server.http.settings import Settings
from support.http import BASE, assert_error_body, serve

pytestmark = pytest.mark.real_model

MAX_MODEL_LEN = 48  # the chat template alone is ~30 tokens: chats can still succeed
# The coverage phase ignores max_examples (~270 boundary cases per operation, many of which
# generate): the examples and fuzzing phases keep the run bounded. Most fuzzed bodies are invalid,
# so a second, positive-only pass makes sure valid sampling fields reach the engine too.
_OPENAPI = create_app(Settings()).openapi()  # the lifespan never runs: no model is loaded for this
_NO_COVERAGE = {"phases": {"coverage": {"enabled": False}}}
schema = schemathesis.openapi.from_dict(_OPENAPI, config=schemathesis.Config.from_dict(_NO_COVERAGE))
valid_only = schemathesis.openapi.from_dict(
    _OPENAPI, config=schemathesis.Config.from_dict({**_NO_COVERAGE, "generation": {"mode": "positive"}})
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    settings = Settings(
        max_model_len=MAX_MODEL_LEN,
        adapter_store=root / "store",
        adapter_root=root / "adapters",
        max_upload_bytes=1_000_000,
    )
    (root / "adapters").mkdir()
    with serve(settings) as served:
        yield served


def _steer(case, share: int) -> None:
    """A fuzzed `model` is almost never a served one, so it would stop at the 404 and the sampling
    fields would never reach the engine: send `share` of every 2 cases (a fixed choice) to the base."""
    if isinstance(case.body, dict) and "model" in case.body and zlib.crc32(repr(case.body).encode()) % 2 < share:
        case.body["model"] = BASE


def test_schema_covers_every_route():
    paths = {
        (method.upper(), path) for path, item in create_app(Settings()).openapi()["paths"].items() for method in item
    }
    assert {
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("POST", "/v1/adapters"),
        ("GET", "/v1/adapters"),
        ("GET", "/v1/adapters/{name}"),
        ("DELETE", "/v1/adapters/{name}"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
        ("GET", "/health"),
        ("GET", "/ready"),
    } <= paths


@schema.parametrize()
@settings(max_examples=20, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_openai_shaped_4xx(case, served):
    _steer(case, share=1)
    _check(case, served)


@valid_only.include(method="POST", path_regex="completions$").parametrize()
@settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_valid_generation_requests_never_fail_the_server(case, served):
    _steer(case, share=2)
    _check(case, served)


def _check(case, served) -> None:
    response = case.call(base_url=served.url, timeout=120)
    assert response.status_code < 500, f"{case.method} {case.path}: {response.status_code} {response.text[:500]}"
    if response.status_code >= 400:
        content_type = response.headers.get("content-type") or response.headers.get("Content-Type") or [""]
        assert content_type[0].startswith("application/json"), response.headers
        assert_error_body(response.json())
