"""Adapter management over raw HTTP: upload, conflict, replace, list, show, delete; vLLM's
load/unload by path under --adapter-root; persistence across restarts; bad uploads that must
leave nothing behind; deleting an adapter while a stream uses it."""

from __future__ import annotations

import json
import math
import shutil
import socket
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from server.http.settings import Settings
from server.store import VERSIONS
from support.http import BASE, adapter_files, assert_nothing_held, assert_openai_error, reference_text, serve, wait_idle

pytestmark = pytest.mark.real_model

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MAX_UPLOAD = 3_000_000  # one valid upload is ~1.9 MB
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, adapter_dirs) -> dict[str, Path]:
    """The store, and an adapter root holding a copy of `beta`."""
    base = tmp_path_factory.mktemp("adapters-http")
    root = base / "root"
    shutil.copytree(adapter_dirs["beta"], root / "beta-on-disk")
    (base / "outside").mkdir()
    shutil.copytree(adapter_dirs["beta"], base / "outside" / "beta")
    return {"store": base / "store", "root": root, "outside": base / "outside"}


@pytest.fixture(scope="module")
def served(dirs):
    settings = Settings(adapter_store=dirs["store"], adapter_root=dirs["root"], max_upload_bytes=MAX_UPLOAD)
    with serve(settings) as served:
        yield served


@pytest.fixture(scope="module")
def http(served):
    with httpx.Client(base_url=served.url, timeout=120) as client:
        yield client


def _upload(http: httpx.Client, name: str, files: dict, **data) -> httpx.Response:
    return http.post("/v1/adapters", data={"name": name, **data}, files=files)


def _complete(http: httpx.Client, model: str, max_tokens: int = 2) -> httpx.Response:
    return http.post(
        "/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
    )


def _store_entries(store: Path) -> list[str]:
    """The store's adapter names and any leftover of an upload (staging or temporary links)."""
    return sorted(p.name for p in store.iterdir() if p.name != VERSIONS) if store.exists() else []


def test_upload_conflict_replace_list_show_delete(served, http, dirs, adapter_dirs):
    response = _upload(http, "up", adapter_files(adapter_dirs["alpha"]))
    assert response.status_code == 201, response.text
    card = response.json()
    assert card["name"] == "up" and card["rank"] == 8 and card["persisted"] is True
    assert len(card["target_modules"]) == 60 and card["num_bytes"] > 0
    assert all(m.endswith(("q_proj", "v_proj")) for m in card["target_modules"])
    assert sorted(p.name for p in (dirs["store"] / "up").iterdir()) == [CONFIG, WEIGHTS]

    conflict = assert_openai_error(_upload(http, "up", adapter_files(adapter_dirs["beta"])), 409, "up", "replace")
    assert conflict["code"] == "adapter_exists"
    alpha_text = _complete(http, "up", 6).json()["choices"][0]["text"]
    assert alpha_text == reference_text(adapter_dirs, PROMPT, "alpha", 6), "the refused upload changed it"

    replaced = _upload(http, "up", adapter_files(adapter_dirs["beta"]), replace="true")
    assert replaced.status_code == 201, replaced.text
    assert (dirs["store"] / "up" / WEIGHTS).read_bytes() == (adapter_dirs["beta"] / WEIGHTS).read_bytes()
    assert _complete(http, "up", 6).json()["choices"][0]["text"] == reference_text(adapter_dirs, PROMPT, "beta", 6)

    listed = http.get("/v1/adapters").json()
    assert listed["object"] == "list" and "up" in [a["name"] for a in listed["data"]]
    shown = http.get("/v1/adapters/up")
    assert shown.status_code == 200 and shown.json()["name"] == "up"
    assert_openai_error(http.get(f"/v1/adapters/{BASE}"), 404, "base model")

    deleted = http.delete("/v1/adapters/up")
    assert deleted.status_code == 200 and deleted.json() == {"id": "up", "object": "adapter", "deleted": True}
    assert_openai_error(_complete(http, "up"), 404, "up")
    assert_openai_error(http.get("/v1/adapters/up"), 404)
    assert_openai_error(http.delete("/v1/adapters/up"), 404)
    assert "up" not in [a["name"] for a in http.get("/v1/adapters").json()["data"]]
    assert not (dirs["store"] / "up").exists() and "up" not in served.engine.registry


def test_load_lora_adapter_is_refused_without_an_adapter_root(plain_server, adapter_dirs):
    body = {"lora_name": "x", "lora_path": str(adapter_dirs["beta"])}
    error = assert_openai_error(
        httpx.post(plain_server.url + "/v1/load_lora_adapter", json=body, timeout=60), 403, "adapter-root"
    )
    assert error["code"] == "adapter_root_unset"
    assert "x" not in plain_server.engine.registry


@pytest.mark.parametrize("where", ["outside", "traversal", "symlink", "nul", "relative"])
def test_load_lora_adapter_outside_the_root_is_400(http, dirs, where):
    root, outside = dirs["root"], dirs["outside"] / "beta"
    if where == "symlink":
        link = root / "sneaky"
        if not link.exists():
            link.symlink_to(outside)
    path = {
        "outside": str(outside),
        "traversal": f"{root}/../outside/beta",
        "symlink": str(root / "sneaky"),
        "nul": f"{root}/beta-on-disk\x00",
        "relative": "outside/beta",
    }[where]
    response = http.post("/v1/load_lora_adapter", json={"lora_name": f"sneaky-{where}", "lora_path": path})
    error = assert_openai_error(response, 400, "lora_path")
    assert error["param"] == "lora_path"
    assert_openai_error(_complete(http, f"sneaky-{where}"), 404)


def test_load_and_unload_lora_adapter_under_the_root(http, dirs, adapter_dirs):
    body = {"lora_name": "ondisk", "lora_path": str(dirs["root"] / "beta-on-disk")}
    loaded = http.post("/v1/load_lora_adapter", json=body)
    assert loaded.status_code == 200 and "ondisk" in loaded.text
    assert _complete(http, "ondisk", 6).json()["choices"][0]["text"] == reference_text(adapter_dirs, PROMPT, "beta", 6)
    models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert models["ondisk"]["parent"] == BASE
    assert_openai_error(http.post("/v1/load_lora_adapter", json=body), 409, "ondisk")
    assert_openai_error(http.post("/v1/load_lora_adapter", json={**body, "lora_name": "../x"}), 400, "name")
    missing = {"lora_name": "missing", "lora_path": str(dirs["root"] / "nothing-here")}
    assert_openai_error(http.post("/v1/load_lora_adapter", json=missing), 400, "does not exist")

    unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "ondisk"})
    assert unloaded.status_code == 200 and "ondisk" in unloaded.text
    assert_openai_error(_complete(http, "ondisk"), 404, "ondisk")
    assert_openai_error(http.post("/v1/unload_lora_adapter", json={"lora_name": "ondisk"}), 404, "ondisk")


def test_uploads_persist_across_restarts(tmp_path, adapter_dirs):
    store = tmp_path / "store"
    with serve(Settings(adapter_store=store)) as first:
        uploaded = httpx.post(
            first.url + "/v1/adapters", data={"name": "kept"}, files=adapter_files(adapter_dirs["gamma"]), timeout=120
        )
        assert uploaded.status_code == 201, uploaded.text
        with httpx.Client(base_url=first.url, timeout=120) as http:
            before = _complete(http, "kept", 6).json()["choices"][0]["text"]
    for file_name in (CONFIG, WEIGHTS):
        assert (store / "kept" / file_name).read_bytes() == (adapter_dirs["gamma"] / file_name).read_bytes()
    assert _store_entries(store) == ["kept"]

    with serve(Settings(adapter_store=store)) as second:
        with httpx.Client(base_url=second.url, timeout=120) as http:
            listed = {a["name"]: a for a in http.get("/v1/adapters").json()["data"]}
            assert listed["kept"]["persisted"] is True
            assert _complete(http, "kept", 6).json()["choices"][0]["text"] == before
    assert before == reference_text(adapter_dirs, PROMPT, "gamma", 6)


# Bad uploads
def _with_tensor_change(files: dict, change) -> dict:
    tensors = load_safetensors(files[WEIGHTS][1])
    change(tensors)
    return {**files, WEIGHTS: (WEIGHTS, save_safetensors(tensors))}


def _first(tensors: dict, part: str) -> str:
    return sorted(k for k in tensors if f"lora_{part}" in k)[0]


def _nan(tensors):
    key = _first(tensors, "B")
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = math.nan


def _wrong_shape(tensors):
    key = _first(tensors, "A")
    tensors[key] = torch.randn(8, 100)


def _config(files: dict, **changes) -> dict:
    config = json.loads(files[CONFIG][1])
    return {**files, CONFIG: (CONFIG, json.dumps({**config, **changes}).encode())}


BAD_UPLOADS = {  # case -> (files from the good ones, status, words the message must contain)
    "config-not-json": (lambda f: {**f, CONFIG: (CONFIG, b"{not json")}, 400, [CONFIG, "JSON"]),
    "config-not-object": (lambda f: {**f, CONFIG: (CONFIG, b"[1, 2]")}, 400, [CONFIG, "object"]),
    "config-missing": (lambda f: {WEIGHTS: f[WEIGHTS]}, 400, [CONFIG, "missing"]),
    "safetensors-missing": (lambda f: {CONFIG: f[CONFIG]}, 400, [WEIGHTS, "missing"]),
    "bin-only": (
        lambda f: {CONFIG: f[CONFIG], "adapter_model.bin": ("adapter_model.bin", b"\x80\x04pickle")},
        400,
        ["adapter_model.bin", "pickle"],
    ),
    "not-safetensors": (lambda f: {**f, WEIGHTS: (WEIGHTS, b"definitely not safetensors")}, 400, [WEIGHTS]),
    "nan-weights": (lambda f: _with_tensor_change(f, _nan), 400, [WEIGHTS, "NaN"]),
    "wrong-shape": (lambda f: _with_tensor_change(f, _wrong_shape), 422, [WEIGHTS, "(8, 100)"]),
    "rank-mismatch": (lambda f: _config(f, r=4), 400, ["rank 8", "r"]),
    "unknown-target": (lambda f: _config(f, target_modules=["nope_proj"]), 422, ["nope_proj"]),
    "dora-without-magnitude": (lambda f: _config(f, use_dora=True), 400, ["lora_magnitude_vector", "missing"]),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_refused_and_leaves_nothing(served, http, dirs, adapter_dirs, case):
    make_files, status, words = BAD_UPLOADS[case]
    before = _snapshot(dirs)
    error = assert_openai_error(
        _upload(http, f"bad-{case}", make_files(adapter_files(adapter_dirs["alpha"]))), status, *words
    )
    assert error["code"] in ("invalid_adapter", "incompatible_adapter", "unsupported_adapter")
    _assert_left_nothing(served, http, dirs, before, f"bad-{case}")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "a..b", "-dash", "x" * 129, "sp ace"])
def test_bad_name_is_refused_and_leaves_nothing(served, http, dirs, adapter_dirs, name):
    before = _snapshot(dirs)
    error = assert_openai_error(_upload(http, name, adapter_files(adapter_dirs["alpha"])), 400, "name")
    assert error["param"] == "name"
    _assert_left_nothing(served, http, dirs, before, name)


@pytest.mark.parametrize("chunked", [False, True])
def test_upload_over_the_limit_is_413(served, http, dirs, adapter_dirs, chunked):
    files = {**adapter_files(adapter_dirs["alpha"]), "padding.bin": ("padding.bin", b"\0" * MAX_UPLOAD)}
    before = _snapshot(dirs)
    if not chunked:
        response = _upload(http, "too-big", files)
    else:  # no Content-Length: the limit must hold while reading, not only on the declared size
        request = http.build_request("POST", "/v1/adapters", data={"name": "too-big"}, files=files)
        body = request.read()
        headers = {"content-type": request.headers["content-type"]}
        response = http.post(
            "/v1/adapters", content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]), headers=headers
        )
        assert "content-length" not in response.request.headers
    error = assert_openai_error(response, 413, "limit", str(MAX_UPLOAD))
    assert error["code"] == "too_large"
    _assert_left_nothing(served, http, dirs, before, "too-big")


def test_chunked_upload_is_refused_while_it_streams(served, http, dirs, adapter_dirs):
    """The 413 comes once the limit is crossed, while the client is still sending: the server
    neither waits for nor keeps what lies past the limit (a raw socket, to see when it answers)."""
    request = http.build_request(
        "POST",
        "/v1/adapters",
        data={"name": "too-big"},
        files={**adapter_files(adapter_dirs["alpha"]), "padding.bin": ("p", b"\0" * 10)},
    )
    head = (
        f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: {request.headers['content-type']}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunk = b"\0" * 65536
    with socket.create_connection(served.url.removeprefix("http://").split(":"), timeout=60) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n" % (len(request.read()), request.read()))
        for _ in range(2 * MAX_UPLOAD // len(chunk)):  # twice the limit, then we stop sending (never end the body)
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = _read_response(sock, timeout=60)  # times out (fails) if the server waits for the end
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    assert "too_large" in answer


def _read_response(sock: socket.socket, timeout: float) -> str:
    """One whole HTTP response off a raw socket: the head and the body may come in separate segments,
    so read until Content-Length is met or the server closes, within `timeout` seconds."""
    deadline, data = time.monotonic() + timeout, b""
    while not _is_complete(data) and (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            segment = sock.recv(65536)
        except ConnectionResetError:  # the server closed on the body we were still sending
            break
        if not segment:
            break
        data += segment
    return data.decode(errors="replace")


def _is_complete(data: bytes) -> bool:
    head, blank, body = data.partition(b"\r\n\r\n")
    if not blank:
        return False
    for line in head.split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False  # no length given: the body ends when the server closes


def _snapshot(dirs: dict[str, Path]) -> list[str]:
    """Every path under the store's parent: a bad name must not create anything, even beside the store."""
    return sorted(str(p.relative_to(dirs["store"].parent)) for p in dirs["store"].parent.rglob("*"))


def _assert_left_nothing(served, http: httpx.Client, dirs: dict[str, Path], before: list[str], name: str) -> None:
    assert name not in [a["name"] for a in http.get("/v1/adapters").json()["data"]]
    assert name not in served.engine.registry
    assert _snapshot(dirs) == before
    assert not [e for e in _store_entries(dirs["store"]) if e.startswith(".")], "a staging directory was left"


def test_delete_while_streaming_finishes_the_stream_then_it_is_gone(served, http, dirs, adapter_dirs):
    assert _upload(http, "doomed", adapter_files(adapter_dirs["beta"])).status_code == 201
    body = {"model": "doomed", "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as stream:
        assert stream.status_code == 200
        events = stream.iter_lines()
        chunks = [json.loads(next(line for line in events if line.startswith("data:"))[5:])]
        deleted = httpx.delete(served.url + "/v1/adapters/doomed", timeout=60)
        assert deleted.status_code == 200, deleted.text
        with httpx.Client(base_url=served.url, timeout=60) as other:
            assert_openai_error(_complete(other, "doomed"), 404)
        rest = [line[5:].strip() for line in events if line.startswith("data:")]
    assert rest[-1] == "[DONE]"
    chunks += [json.loads(data) for data in rest[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert text == reference_text(adapter_dirs, PROMPT, "beta", 12), "the adapter changed under the stream"

    assert "doomed" not in [a["name"] for a in http.get("/v1/adapters").json()["data"]]
    assert not (dirs["store"] / "doomed").exists()
    wait_idle(served)
    assert_nothing_held(served.engine)
    assert "doomed" not in served.engine.registry.resident(), "the slot outlived the adapter's last user"
