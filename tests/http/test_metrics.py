"""/metrics after real HTTP traffic, parsed with prometheus-client's own parser."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.http.metrics import BASE_LABEL, OVERFLOW_LABEL, AdapterLabels
from server.http.settings import Settings
from support.engine import wait_for_engine
from support.http import serve as serve_app
from support.http import wait_idle as wait_engine_idle

pytestmark = pytest.mark.real_model
BASE = "SmolLM2-135M-Instruct"


@contextmanager
def serve(settings: Settings):
    """The app under the shared harness, and a client on its URL."""
    with serve_app(settings) as served, httpx.Client(base_url=served.url, timeout=120) as client:
        yield served, client


def scrape(client: httpx.Client) -> dict:
    """{family name: family} as prometheus-client parses the exposition."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return {family.name: family for family in text_string_to_metric_families(response.text)}


def value(families: dict, name: str, sample: str | None = None, **labels) -> float:
    family = families[name]
    matches = [
        s.value
        for s in family.samples
        if s.name == (sample or name) and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    return sum(matches)


def wait_idle(served, client: httpx.Client) -> dict:
    """The families once the engine is idle and has published the step that finished the last request."""
    wait_engine_idle(served)
    return scrape(client)


@pytest.fixture(scope="module")
def qv_server(adapter_dir):
    """(served, client) on a server with the adapter `qv`, shared by the tests that read its metrics:
    each counts from its own start and leaves the engine idle."""
    with serve(Settings(adapters=[f"qv={adapter_dir}"])) as pair:
        yield pair


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory, default_model, make_peft_adapter):
    return make_peft_adapter(
        default_model.model,
        tmp_path_factory.mktemp("metrics") / "qv",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
    )


def complete(client, model: str, max_tokens: int = 4, **extra) -> dict:
    body = {
        "model": model,
        "prompt": "Hello there",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_families_exist_with_types_and_move_by_the_traffic(qv_server):
    served, client = qv_server
    before = wait_idle(served, client)  # the server is shared: the counters move from here
    usages = [complete(client, BASE)["usage"], complete(client, "qv")["usage"], complete(client, "qv")["usage"]]
    assert client.post("/v1/completions", json={"model": "missing", "prompt": "x"}).status_code == 404
    after = wait_idle(served, client)

    expected_types = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:lora_requests_info": "gauge",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:time_per_output_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "loraserve:requests": "counter",
        "loraserve:adapter_request_latency_seconds": "histogram",
        "loraserve:adapter_prompt_tokens": "counter",
        "loraserve:adapter_generation_tokens": "counter",
        "loraserve:engine_steps": "counter",
        "loraserve:adapter_swap_seconds": "histogram",
        "loraserve:adapter_loads": "counter",
        "loraserve:adapter_evictions": "counter",
        "loraserve:adapter_slots_used": "gauge",
        "loraserve:adapter_slots_total": "gauge",
        "loraserve:adapter_host_cache_used": "gauge",
        "loraserve:adapter_resident": "gauge",
        "loraserve:lora_resident_info": "gauge",
        "loraserve:step_duration_seconds": "histogram",
        "loraserve:batch_size": "histogram",
        "loraserve:kv_cache_capacity_tokens": "gauge",
        "loraserve:memory_plan_bytes": "gauge",
        "loraserve:merge_buffer_bytes": "gauge",
        "vllm:num_preemptions": "counter",
    }
    for name, kind in expected_types.items():
        assert after[name].type == kind, name

    def moved(name, sample=None, **labels):
        return value(after, name, sample, **labels) - value(before, name, sample, **labels)

    assert moved("loraserve:requests", "loraserve:requests_total", adapter=BASE_LABEL, finish_reason="length") == 1
    assert moved("loraserve:requests", "loraserve:requests_total", adapter="qv", finish_reason="length") == 2
    assert moved("vllm:request_success", "vllm:request_success_total", finished_reason="length") == 3
    assert moved("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 3
    assert moved("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 3
    assert moved("vllm:prompt_tokens", "vllm:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved("vllm:generation_tokens", "vllm:generation_tokens_total") == sum(
        u["completion_tokens"] for u in usages
    )
    assert moved("loraserve:adapter_generation_tokens", "loraserve:adapter_generation_tokens_total", adapter="qv") == 8
    assert moved("loraserve:engine_steps", "loraserve:engine_steps_total") > 0
    assert value(after, "loraserve:adapter_loads", "loraserve:adapter_loads_total") >= 1
    assert value(after, "vllm:kv_cache_usage_perc") == 0
    # The adapter stays resident after its requests finished: a router can see the pod is warm.
    assert value(after, "loraserve:adapter_resident", adapter="qv", tier="device") == 1
    warm = after["loraserve:lora_resident_info"].samples[0]
    assert warm.labels["resident_lora_adapters"] == "qv" and warm.value > time.time() - 600
    info = after["vllm:lora_requests_info"].samples[0]
    assert info.labels == {"max_lora": "4", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    # The memory plan: no budget on CPU, so the pool is the configured tokens and merges are unlimited.
    plan = {sample.labels["part"]: sample.value for sample in after["loraserve:memory_plan_bytes"].samples}
    assert {"weights", "lora_slots", "activations", "kv_cache"} <= plan.keys() and "budget" not in plan
    assert plan["weights"] > 100 * 2**20  # SmolLM2-135M in float32
    capacity = value(after, "loraserve:kv_cache_capacity_tokens")
    assert plan["kv_cache"] == capacity * 2 * 30 * 3 * 64 * 4  # K and V, 30 layers, 3 KV heads of 64, fp32


def test_lora_requests_info_names_running_adapters(qv_server):
    _, client = qv_server
    done = threading.Event()
    seen = set()

    def watch():
        while not done.is_set():
            seen.add(scrape(client)["vllm:lora_requests_info"].samples[0].labels["running_lora_adapters"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        complete(client, "qv", max_tokens=48)
    finally:
        done.set()
        watcher.join()
    assert "qv" in seen


def test_adapter_label_cardinality_is_capped(tmp_path, default_model, make_peft_adapter):
    names = ["a1", "a2", "a3", "a4"]
    specs = [
        f"{n}={make_peft_adapter(default_model.model, tmp_path / n, r=2, target_modules=['q_proj'])}" for n in names
    ]
    with serve(Settings(adapters=specs, max_adapter_labels=2)) as (served, client):
        for name in names:
            complete(client, name, max_tokens=1)
        families = wait_idle(served, client)
    labels = {s.labels["adapter"] for s in families["loraserve:requests"].samples if s.name.endswith("_total")}
    assert labels == {"a1", "a2", OVERFLOW_LABEL}
    assert value(families, "loraserve:requests", "loraserve:requests_total", adapter=OVERFLOW_LABEL) == 2


def test_adapter_labels_unit():
    labels = AdapterLabels(cap=1)
    assert [labels(None), labels("x"), labels("y"), labels("x")] == [BASE_LABEL, "x", OVERFLOW_LABEL, "x"]


def test_metrics_key_and_request_log(adapter_dir, caplog):
    settings = Settings(api_key="k", metrics_require_key=True)
    with serve(settings) as (served, client):
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
        with caplog.at_level(logging.INFO, logger="loraserve.requests"):
            response = client.post(
                "/v1/completions",
                headers={"Authorization": "Bearer k"},
                json={"model": BASE, "prompt": "secret prompt words", "max_tokens": 2},
            )
            assert response.status_code == 200
            # logged by the metrics' request listener, on the engine thread once the request finished
            wait_for_engine(served.engine, lambda: caplog.records, 10, "the request log line")
    record = caplog.records[-1]
    assert record.fields["outcome"] == "length" and record.fields["output_tokens"] == 2
    assert "secret" not in record.getMessage() and "secret" not in str(record.fields)
