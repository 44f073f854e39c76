"""Property-based fuzzing of every operation in the app's own OpenAPI schema (schemathesis), against
the live server: no input may cause a 5xx, and every 4xx must carry OpenAI's error shape.

Bounded: a few examples per operation, derandomized, and a small context (max_model_len) so a
fuzzed max_tokens or n can never make one example generate for long.
"""

from __future__ import annotations

import json
import zlib

import httpx
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


# Hostile values (issue 24): every class of value that once gave a 500 somewhere, sent into every
# field of every JSON route and every path or query parameter. Generated strategies rarely produce
# them (a lone surrogate, a look-alike digit, 10,000 nested brackets), so they are swept here.
DEEP = 3000  # past Python's recursion limit
HOSTILE_VALUES = {
    "surrogate": "\ud800",
    "look-alike digit": "²",
    "int64 max + 1": 2**63,
    "huge float": 1e308,
    "infinity": float("inf"),
    "nan": float("nan"),
    "true": True,
    "one as float": 1.0,
    "null": None,
    "long string": "x" * 20_000,
    "deep arrays": "<deep-arrays>",
    "deep objects": "<deep-objects>",
    "map of surrogates": {"\ud800": "a\udc00b"},
}
_DEEP_TEXT = {'"<deep-arrays>"': "[" * DEEP + "]" * DEEP, '"<deep-objects>"': '{"a":' * DEEP + "1" + "}" * DEEP}
MINIMAL_BODIES = {
    "/v1/completions": {"model": BASE, "prompt": "Hi", "max_tokens": 1},
    "/v1/chat/completions": {"model": BASE, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "/v1/adapters": {"name": "hostile", "compose": [{"name": "nothing-here", "scale": 1.0}]},
    "/v1/load_lora_adapter": {"lora_name": "hostile", "lora_path": "nowhere"},
    "/v1/unload_lora_adapter": {"lora_name": "hostile"},
}
HOSTILE_PATH_PARTS = ["%ED%A0%80", "%FF%FE", "x" * 300, "..", "%2e%2e%2f", "%00", "²"]


def _json_routes() -> list[tuple[str, list[str]]]:
    """Each JSON route with its top-level fields from the OpenAPI schema, plus the fields inside the
    minimal body's first message and composition term (nested objects the server parses)."""
    components = _OPENAPI["components"]["schemas"]
    routes = []
    for path, body in MINIMAL_BODIES.items():
        content = _OPENAPI["paths"][path]["post"].get("requestBody", {}).get("content", {})
        ref = content.get("application/json", {}).get("schema", {}).get("$ref", "")
        fields = list(components[ref.rsplit("/", 1)[-1]]["properties"]) if ref else list(body)
        fields += [f"messages.0.{k}" for k in ("role", "content", "name")] if "messages" in body else []
        fields += [f"compose.0.{k}" for k in ("name", "scale")] if "compose" in body else []
        routes.append((path, fields))
    return routes


def _with(body: dict, field: str, value) -> str:
    """The body as JSON text with `field` (dotted, list indices as digits) set to `value`."""
    body = json.loads(json.dumps(body))
    *parents, last = field.split(".")
    target = body
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    target[int(last) if isinstance(target, list) else last] = value
    text = json.dumps(body)  # ensure_ascii: a lone surrogate leaves as the escape "\ud800"
    for placeholder, deep in _DEEP_TEXT.items():
        text = text.replace(placeholder, deep)
    return text


@pytest.mark.parametrize("path, fields", _json_routes(), ids=[p for p, _ in _json_routes()])
def test_hostile_values_in_every_field_are_never_a_server_error(served, path, fields):
    failures = []
    with httpx.Client(base_url=served.url, timeout=120, headers={"Content-Type": "application/json"}) as http:
        for field in fields:
            for name, value in HOSTILE_VALUES.items():
                response = http.post(path, content=_with(MINIMAL_BODIES[path], field, value))
                if response.status_code >= 500:
                    failures.append(f"{field}={name}: {response.status_code} {response.text[:200]}")
                elif response.status_code >= 400:
                    assert_error_body(response.json())
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("part", HOSTILE_PATH_PARTS)
def test_hostile_path_and_query_parameters_are_never_a_server_error(served, part):
    with httpx.Client(base_url=served.url, timeout=60) as http:
        for method, url in [
            ("GET", f"/v1/adapters/{part}"),
            ("DELETE", f"/v1/adapters/{part}"),
            ("GET", f"/v1/adapters/{part}/analysis"),
            ("GET", f"/v1/adapters/{part}/similarity?other={part}"),
        ]:
            response = http.request(method, url)
            assert response.status_code < 500, f"{method} {url}: {response.status_code} {response.text[:200]}"
            if response.status_code >= 400:
                assert_error_body(response.json())
