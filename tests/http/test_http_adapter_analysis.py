"""The analysis, similarity and compression routes through the real app on the default model:
numbers against a dense float64 reference, typed errors, and a compressed upload that serves
PEFT's greedy tokens of the original and is what the store keeps."""

from __future__ import annotations

import copy
import json
import re

import httpx
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GenerationConfig

from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_loader import load_base_model
from server.engine.sampling_params import SamplingParams
from server.http.settings import Settings
from support.analysis import dense_reference, low_rank_adapter, projector_similarity, reference_effective_rank
from support.http import adapter_files, assert_openai_error, serve

pytestmark = pytest.mark.real_model

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
NUM_TOKENS = 12
CHECKED_LAYERS = 6  # the dense reference costs a full SVD per layer: a sample is enough here


@pytest.fixture(scope="module")
def low_rank(tmp_path_factory, default_model, make_peft_adapter):
    """r=32 on q_proj and v_proj, every update of rank 4."""
    return low_rank_adapter(
        default_model.model,
        tmp_path_factory.mktemp("low") / "low32",
        make_peft_adapter,
        target_modules=["q_proj", "v_proj"],
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory, adapter_dirs):
    root = tmp_path_factory.mktemp("analysis-server")
    (root / "lora").mkdir()
    with serve(Settings(adapter_store=root / "store", adapter_root=root / "lora", max_lora_rank=32)) as server:
        for name in ("alpha", "beta"):
            response = httpx.post(
                f"{server.url}/v1/adapters", data={"name": name}, files=adapter_files(adapter_dirs[name]), timeout=60
            )
            assert response.status_code == 201, response.text
        yield server


def test_analysis_matches_dense_reference_and_is_cached_per_version(served, default_model, adapter_dirs):
    first = httpx.get(f"{served.url}/v1/adapters/alpha/analysis", timeout=120).json()
    reference = dense_reference(default_model.model, adapter_dirs["alpha"])
    modules = [la["module"] for la in first["layers"]]
    assert first["name"] == "alpha" and sorted(modules) == sorted(reference)
    layer_numbers = [int(m.split(".")[2]) for m in modules]
    assert layer_numbers == sorted(layer_numbers)  # layer 2 before layer 10
    for layer in first["layers"][:CHECKED_LAYERS]:
        ref = reference[layer["module"]]
        u, s, vh = torch.linalg.svd(ref["delta"])
        assert (layer["rank"], layer["scale"]) == (8, ref["scale"])
        assert layer["delta_norm"] == pytest.approx(float(s.norm()), rel=1e-9)
        assert layer["singular_values"] == pytest.approx(s[:8].tolist(), rel=1e-8)
        assert layer["effective_rank"]["0.9"] == reference_effective_rank(s, 0.9)
        projected = torch.linalg.matrix_norm(u[:, :8].T @ ref["w0"] @ vh[:8].T)
        assert layer["amplification"] == pytest.approx(float(s.norm() / projected), rel=1e-8)
    assert httpx.get(f"{served.url}/v1/adapters/alpha/analysis", timeout=60).json() == first


def test_a_replace_is_analyzed_afresh(served, default_model, adapter_dirs):
    for files, replace in ((adapter_dirs["alpha"], "false"), (adapter_dirs["gamma"], "true")):
        response = httpx.post(
            f"{served.url}/v1/adapters",
            data={"name": "replaced", "replace": replace},
            files=adapter_files(files),
            timeout=60,
        )
        assert response.status_code == 201, response.text
        replaced = httpx.get(f"{served.url}/v1/adapters/replaced/analysis", timeout=120).json()
    gamma = dense_reference(default_model.model, adapter_dirs["gamma"])
    layer = replaced["layers"][0]
    assert layer["delta_norm"] == pytest.approx(
        float(torch.linalg.matrix_norm(gamma[layer["module"]]["delta"])), rel=1e-9
    )


def test_similarity_matches_projectors(served, default_model, adapter_dirs):
    body = httpx.get(f"{served.url}/v1/adapters/beta/similarity", params={"other": "alpha"}, timeout=120).json()
    assert (body["name"], body["other"]) == ("beta", "alpha")
    ref_beta = dense_reference(default_model.model, adapter_dirs["beta"])
    ref_alpha = dense_reference(default_model.model, adapter_dirs["alpha"])
    for layer in body["layers"][:CHECKED_LAYERS]:
        expected = projector_similarity(ref_beta[layer["module"]]["a"], ref_alpha[layer["module"]]["a"])
        assert layer["similarity"] == pytest.approx(expected, rel=1e-8)
    assert body["mean"] == pytest.approx(sum(la["similarity"] for la in body["layers"]) / len(body["layers"]))


@pytest.mark.parametrize(
    "path,param",
    [
        ("/v1/adapters/nope/analysis", None),
        ("/v1/adapters/nope/similarity?other=beta", None),
        ("/v1/adapters/beta/similarity?other=nope", "other"),
        ("/v1/adapters/SmolLM2-135M-Instruct/analysis", None),
    ],
)
def test_unknown_adapters_are_404(served, path, param):
    error = assert_openai_error(httpx.get(f"{served.url}{path}", timeout=30), 404)
    assert error["code"] == "model_not_found" and error["param"] == param


def test_similarity_needs_other(served):
    error = assert_openai_error(httpx.get(f"{served.url}/v1/adapters/beta/similarity", timeout=30), 400, "other")
    assert error["param"] == "other"


@pytest.mark.parametrize(
    "fields,param",
    [
        ({"energy": "0"}, "energy"),
        ({"energy": "1.5"}, "energy"),
        ({"energy": "lots"}, "energy"),
        ({"max_rank": "0"}, "max_rank"),
        ({"max_rank": "2.5"}, "max_rank"),
    ],
)
def test_bad_compression_fields_are_400_naming_them(served, adapter_dirs, fields, param):
    response = httpx.post(
        f"{served.url}/v1/adapters",
        data={"name": "bad", **fields},
        files=adapter_files(adapter_dirs["beta"]),
        timeout=60,
    )
    assert assert_openai_error(response, 400, param)["param"] == param
    assert "bad" not in served.state.store


def test_compressed_upload_serves_peft_greedy_tokens_and_is_stored(served, default_model, low_rank):
    response = httpx.post(
        f"{served.url}/v1/adapters",
        data={"name": "low", "energy": "0.9999"},
        files=adapter_files(low_rank),
        timeout=120,
    )
    assert response.status_code == 201, response.text
    card = response.json()
    assert card["rank"] == 4
    compression = card["compression"]
    assert compression["rank_before"] == 32 and compression["params_after"] * 8 == compression["params_before"]
    assert compression["energy_kept"] == pytest.approx(1.0, abs=1e-9)
    models = {m["id"]: m for m in httpx.get(f"{served.url}/v1/models", timeout=30).json()["data"]}
    assert models["low"]["rank"] == 4
    stored = served.state.store.current("low")
    config = json.loads((stored / "adapter_config.json").read_text())
    assert set(config["rank_pattern"].values()) == {4}
    assert {t.shape[0] for k, t in load_file(stored / "adapter_model.safetensors").items() if ".lora_A." in k} == {4}
    expected = _peft_greedy(default_model, low_rank)
    assert _engine_greedy(stored) == expected  # the stored copy, served by the engine alone
    for prompt, tokens in zip(PROMPTS, expected):
        body = {"model": "low", "prompt": prompt, "max_tokens": NUM_TOKENS, "temperature": 0, "ignore_eos": True}
        text = httpx.post(f"{served.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert text == default_model.tokenizer.decode(tokens)
    metrics = httpx.get(f"{served.url}/metrics", timeout=30).text
    assert re.search(r'^loraserve:adapter_rank\{adapter="low"\} 4\.0$', metrics, re.M), metrics
    params = compression["params_after"]
    assert re.search(rf'^loraserve:adapter_params\{{adapter="low"\}} {params}\.0$', metrics, re.M)


def test_vllm_load_compresses_to_max_rank(served, low_rank):
    target = served.state.settings.adapter_root / "low32"
    target.mkdir(exist_ok=True)
    for name, (_, data) in adapter_files(low_rank).items():
        (target / name).write_bytes(data)
    bad = httpx.post(
        f"{served.url}/v1/load_lora_adapter",
        timeout=60,
        json={"lora_name": "vllm-low", "lora_path": str(target), "energy": 2},
    )
    assert assert_openai_error(bad, 400, "energy")["param"] == "energy"
    response = httpx.post(
        f"{served.url}/v1/load_lora_adapter",
        timeout=60,
        json={"lora_name": "vllm-low", "lora_path": str(target), "max_rank": 2},
    )
    assert response.status_code == 200, response.text
    models = {m["id"]: m for m in httpx.get(f"{served.url}/v1/models", timeout=30).json()["data"]}
    assert models["vllm-low"]["rank"] == 2


def _peft_greedy(default_model, path) -> list[list[int]]:
    model = copy.deepcopy(default_model.model)
    model.generation_config.eos_token_id = None  # the server runs with ignore_eos
    reference = PeftModel.from_pretrained(model, str(path))
    greedy = GenerationConfig(
        max_new_tokens=NUM_TOKENS, do_sample=False, pad_token_id=default_model.tokenizer.eos_token_id
    )
    outputs = []
    for prompt in PROMPTS:
        ids = default_model.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            outputs.append(reference.generate(ids, generation_config=greedy)[0, ids.shape[1] :].tolist())
    return outputs


def _engine_greedy(path) -> list[list[int]]:
    engine = LLMEngine(load_base_model(), EngineConfig())
    engine.registry.add("low", path)
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params, ["low"] * len(PROMPTS))]
