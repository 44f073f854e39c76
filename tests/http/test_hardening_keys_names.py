"""Keys that cannot protect anything are refused at startup; names cannot shadow the base or a
composition; metric labels stay under the cap everywhere; /v1/models shows no server path; an
adapter file that is nested too deep, holds a 4300-digit integer or float8 weights is a typed 400."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest
import safetensors.torch
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from server.http.settings import Settings
from support.http import BASE, adapter_files, assert_openai_error, serve
from support.servers import LORASERVE_BIN, server_env

pytestmark = pytest.mark.real_model

CAP = 1  # max_adapter_labels: with three adapters in use, two must share the overflow label
NAMES = ("alpha", "beta", "gamma")


@pytest.mark.parametrize("field", ["api_key", "admin_key"])
@pytest.mark.parametrize("key", ["", "  ", "secret\n", " secret"])
def test_empty_or_padded_keys_are_refused_naming_the_setting(field, key):
    with pytest.raises(ValidationError, match=f"LORASERVE_{field.upper()}"):
        Settings(**{field: key})


def test_serve_exits_on_an_empty_admin_key_naming_it():
    env = {**server_env(), "LORASERVE_ADMIN_KEY": ""}
    done = subprocess.run(
        [str(LORASERVE_BIN), "serve", "--port", "0"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "LORASERVE_ADMIN_KEY" in done.stderr + done.stdout


@pytest.fixture(scope="module")
def served(adapter_dirs, tmp_path_factory):
    store = tmp_path_factory.mktemp("names-store")
    settings = Settings(
        adapter_store=store,
        adapter_root=os.path.commonpath([str(p) for p in adapter_dirs.values()]),
        max_adapter_labels=CAP,
        kv_cache_tokens=2048,
        max_num_seqs=4,
    )
    with serve(settings) as served:
        with httpx.Client(base_url=served.url, timeout=120) as http:
            for name in NAMES:
                assert http.post(
                    "/v1/adapters", data={"name": name}, files=adapter_files(adapter_dirs[name])
                ).is_success
            assert http.post(
                "/v1/adapters", json={"name": "mix", "compose": [{"name": "alpha", "scale": 1}]}
            ).is_success
        yield served


def _upload(http: httpx.Client, name: str, files: dict) -> httpx.Response:
    return http.post("/v1/adapters", data={"name": name}, files=files)


def test_names_are_unique_across_adapters_compositions_and_the_base(served, adapter_dirs):
    files = adapter_files(adapter_dirs["beta"])
    with httpx.Client(base_url=served.url, timeout=120) as http:
        assert_openai_error(_upload(http, BASE, files), 409, "base model")
        assert_openai_error(_upload(http, "mix", files), 409, "composition")
        newline = assert_openai_error(_upload(http, "name\n", files), 400)
        assert newline["param"] == "name"
        path = str(adapter_dirs["beta"])
        assert_openai_error(http.post("/v1/load_lora_adapter", json={"lora_name": "mix", "lora_path": path}), 409)
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
        assert ids.count(BASE) == 1 and ids.count("mix") == 1 and "name\n" not in ids


def test_models_list_shows_no_server_path(served):
    with httpx.Client(base_url=served.url, timeout=120) as http:
        cards = http.get("/v1/models").json()["data"]
    assert all(os.sep not in (card.get("root") or "") for card in cards), cards


def test_every_adapter_label_is_capped(served):
    with httpx.Client(base_url=served.url, timeout=120) as http:
        for name in NAMES:
            assert http.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2}).is_success
        text = http.get("/metrics").text
    seen = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            seen.update(v for k, v in labels.items() if k == "adapter")
            for key in (
                "running_lora_adapters",
                "waiting_lora_adapters",
                "resident_lora_adapters",
                "host_lora_adapters",
            ):
                seen.update(v for v in labels.get(key, "").split(",") if v)
    adapters = seen - {"__base__", "__other__"}
    assert len(adapters) <= CAP and "__other__" in seen, seen


def _config(adapter_dirs) -> dict:
    return json.loads((adapter_dirs["beta"] / "adapter_config.json").read_text())


@pytest.mark.parametrize("case", ["deep", "huge_int"])
def test_hostile_config_json_is_a_400_naming_the_file(served, adapter_dirs, case):
    config = json.dumps(_config(adapter_dirs))
    if case == "deep":
        config = config[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    else:
        config = config[:-1] + ', "x": ' + "9" * 5000 + "}"
    files = adapter_files(adapter_dirs["beta"]) | {"adapter_config.json": ("adapter_config.json", config.encode())}
    with httpx.Client(base_url=served.url, timeout=120) as http:
        assert_openai_error(_upload(http, f"hostile-{case.replace('_', '-')}", files), 400, "adapter_config.json")
        assert http.get("/health").status_code == 200


def test_float8_weights_are_a_400_naming_the_tensor(served, adapter_dirs):
    tensors = safetensors.torch.load_file(str(adapter_dirs["beta"] / "adapter_model.safetensors"))
    tensors = {key: value.to(torch.float8_e4m3fn) for key, value in tensors.items()}
    files = adapter_files(adapter_dirs["beta"]) | {
        "adapter_model.safetensors": ("adapter_model.safetensors", safetensors.torch.save(tensors))
    }
    with httpx.Client(base_url=served.url, timeout=120) as http:
        error = assert_openai_error(_upload(http, "float8", files), 400, "float8")
    assert error["param"] in tensors
