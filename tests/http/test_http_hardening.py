"""The hardening issue's defects, each through real HTTP on the real app and model: chat length,
request limits, client disconnects, engine failures as OpenAI errors, adapter versions that
outlive a replace or delete, upload races on one store, and a dead engine thread."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from server.engine.model_loader import load_base_model
from server.http.app import create_app
from server.http.settings import Settings
from support.engine import break_loop_when_busy, wait_for_engine
from support.http import BASE, adapter_files, assert_nothing_held, assert_openai_error, reference_text, serve, wait_idle
from support.servers import serve_in_thread

pytestmark = pytest.mark.real_model

MAX_MODEL_LEN = 320
ADMIN = {"Authorization": "Bearer admin"}


@pytest.fixture(scope="module")
def served(adapter_dirs, tmp_path_factory):
    store = tmp_path_factory.mktemp("hardening-store")
    settings = Settings(
        adapters=[f"alpha={adapter_dirs['alpha']}", f"beta={adapter_dirs['beta']}"],
        adapter_store=store,
        max_model_len=MAX_MODEL_LEN,
        admin_key="admin",
    )
    with serve(settings) as served:
        yield served


@pytest.fixture
def http(served):
    with httpx.Client(base_url=served.url, timeout=300) as client:
        yield client
    wait_idle(served)
    assert_nothing_held(served.engine)


def finished(served) -> list:
    """Every request the engine finishes from now on (its RequestStats)."""
    records: list = []
    served.engine.request_listeners.append(records.append)
    return records


# Chat length
def test_chat_without_max_tokens_runs_to_the_end_of_the_answer(served):
    client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused")
    answer = client.chat.completions.create(
        model=BASE, temperature=0, messages=[{"role": "user", "content": "Write a long story about a dragon."}]
    )
    choice = answer.choices[0]
    assert answer.usage.completion_tokens > 16, "the old default of 16 tokens still applies"
    if choice.finish_reason == "length":  # no end of answer before the context ran out
        assert answer.usage.prompt_tokens + answer.usage.completion_tokens == MAX_MODEL_LEN
    else:
        assert choice.finish_reason == "stop"


# Limits
@pytest.mark.parametrize(
    "stop, words",
    [
        (["a", "b", "c", "d", "e"], ["at most 4", "stop"]),
        (["x" * 257], ["256 characters", "stop"]),
        ([""], ["empty", "stop"]),
    ],
)
def test_stop_sequences_are_bounded(http, stop, words):
    for path, body in (
        ("/v1/completions", {"prompt": "Hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ):
        error = assert_openai_error(http.post(path, json={"model": BASE, "stop": stop, **body}), 400, *words)
        assert error["param"] == "stop"


def test_oversized_prompts_are_refused_before_tokenizing(served, http):
    limit = served.state.limits.max_prompt_bytes
    assert limit >= MAX_MODEL_LEN  # derived from max_model_len: no token is shorter than a byte
    huge = "a" * (limit + 1)
    error = assert_openai_error(http.post("/v1/completions", json={"model": BASE, "prompt": huge}), 400, "bytes")
    assert error["param"] == "prompt"
    chat = {"model": BASE, "messages": [{"role": "user", "content": huge}]}
    assert assert_openai_error(http.post("/v1/chat/completions", json=chat), 400, "bytes")["param"] == "messages"
    ids = {"model": BASE, "prompt": [1] * (MAX_MODEL_LEN + 1)}
    assert assert_openai_error(http.post("/v1/completions", json=ids), 400, "token ids")["param"] == "prompt"


def test_prompt_byte_limit_is_a_setting(adapter_dirs):
    with serve(Settings(max_prompt_bytes=64)) as served, httpx.Client(base_url=served.url, timeout=60) as http:
        assert (
            http.post("/v1/completions", json={"model": BASE, "prompt": "a" * 64, "max_tokens": 1}).status_code == 200
        )
        assert_openai_error(
            http.post("/v1/completions", json={"model": BASE, "prompt": "a" * 65}), 400, "65 bytes", "max_prompt_bytes"
        )


# Disconnects
def test_a_non_streaming_client_that_leaves_aborts_its_request(served, http):
    records = finished(served)
    body = {"model": "alpha", "prompt": "Count to a thousand:", "max_tokens": 250, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json=body, timeout=1.5)
    wait_for_engine(served.engine, lambda: records, 60, "the abort of the abandoned request")
    (record,) = records
    assert record.finish_reason == "abort" and record.num_output_tokens < 250


# Engine failures
def fail_next_step(served, times: int = 1) -> None:
    """Inject a device-style failure into the next `times` forward passes."""
    runner = served.engine.runner
    run, left = runner.run, [times]

    def failing(*args, **kwargs):
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("injected device failure")
        return run(*args, **kwargs)

    runner.run = failing


def test_engine_failure_is_a_500_with_an_openai_error(served, http):
    fail_next_step(served)
    response = http.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 4})
    error = assert_openai_error(response, 500, "engine failed")
    assert error["code"] == "engine_error"
    assert http.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_engine_failure_mid_stream_is_an_error_event(served, http):
    body = {"model": BASE, "prompt": "Hi", "max_tokens": 4, "stream": True}
    fail_next_step(served)
    events = []
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "engine_error" and "engine failed" in error["message"]
    reasons = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"]]
    assert "abort" not in reasons


# Adapter versions
def test_delete_and_replace_never_change_accepted_requests(served, http, adapter_dirs):
    upload = {"name": "moving"}
    assert (
        http.post("/v1/adapters", data=upload, files=adapter_files(adapter_dirs["alpha"]), headers=ADMIN).status_code
        == 201
    )
    prompt, expected = "Once upon a time", reference_text(adapter_dirs, "Once upon a time", "alpha", 24)
    body = {"model": "moving", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        replaced = http.post(
            "/v1/adapters", data={**upload, "replace": "true"}, files=adapter_files(adapter_dirs["beta"]), headers=ADMIN
        )
        assert replaced.status_code == 201
        rest = [line[6:] for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    text = "".join(json.loads(e)["choices"][0]["text"] for e in [first[6:], *rest])
    assert text == expected, "the request switched adapters half-way"
    after = http.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"]
    assert after == reference_text(adapter_dirs, prompt, "beta", 24)

    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert http.delete("/v1/adapters/moving", headers=ADMIN).status_code == 200
        rest = [line[6:] for line in lines if line.startswith("data: ") and line != "data: [DONE]"]
    chunks = [json.loads(e)["choices"][0] for e in [first[6:], *rest]]
    assert "".join(c["text"] for c in chunks) == after and chunks[-1]["finish_reason"] == "length"
    assert_openai_error(http.post("/v1/completions", json=body), 404, "moving")


# Concurrent writers
def test_concurrent_uploads_of_one_new_name_have_one_winner(served, http, adapter_dirs):
    sources = ["alpha", "beta", "gamma", "alpha"]
    answers: list = [None] * len(sources)
    start = threading.Barrier(len(sources))

    def upload(i: int) -> None:
        files = adapter_files(adapter_dirs[sources[i]])
        with httpx.Client(base_url=served.url, timeout=120) as client:
            start.wait()
            answers[i] = client.post("/v1/adapters", data={"name": "contested"}, files=files, headers=ADMIN)

    threads = [threading.Thread(target=upload, args=(i,)) for i in range(len(sources))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201, 409, 409, 409], [a.text for a in answers]
    winner = sources[next(i for i, a in enumerate(answers) if a.status_code == 201)]
    stored = served.state.store.path("contested")
    for file_name, (_, data) in adapter_files(adapter_dirs[winner]).items():
        assert (stored / file_name).read_bytes() == data
    body = {"model": "contested", "prompt": "1 2 3", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    served_text = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert served_text == reference_text(adapter_dirs, "1 2 3", winner, 8)
    assert http.delete("/v1/adapters/contested", headers=ADMIN).status_code == 200


# A dead engine thread
def test_a_dead_engine_thread_turns_health_to_503_and_reports_once(adapter_dirs):
    reasons: list[str] = []
    app = create_app(Settings(), base=load_base_model(), on_fatal=reasons.append)
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        assert http.get("/health").status_code == 200
        break_loop_when_busy(app.state.server.engine)
        response = http.post("/v1/completions", json={"model": BASE, "prompt": "Hi", "max_tokens": 8})
        assert_openai_error(response, 503, "engine has stopped")
        assert_openai_error(http.get("/health"), 503, "engine thread died")
        assert_openai_error(http.get("/ready"), 503, "engine thread died")
        assert_openai_error(http.post("/v1/completions", json={"model": BASE, "prompt": "Hi"}), 503, "died")
    assert len(reasons) == 1 and "injected" in reasons[0]


# Config regexes from uploads
@pytest.mark.parametrize(
    "field, value", [("target_modules", "("), ("rank_pattern", {"(": 4}), ("target_modules", "(.|.)*X")]
)
def test_upload_with_a_bad_or_catastrophic_regex(served, http, adapter_dirs, field, value):
    """An invalid pattern is a 400 naming its field; a catastrophic one runs in linear time (RE2) and
    simply matches nothing, while /health keeps answering."""
    files = adapter_files(adapter_dirs["alpha"])
    config = json.loads(files["adapter_config.json"][1])
    config[field] = value
    files["adapter_config.json"] = ("adapter_config.json", json.dumps(config).encode())
    response = http.post("/v1/adapters", data={"name": "regex"}, files=files, headers=ADMIN)
    if value == "(.|.)*X":
        assert_openai_error(response, 422, "matches no module")
    else:
        assert assert_openai_error(response, 400, "pattern")["param"].startswith(field)
    assert http.get("/health").status_code == 200
    assert "regex" not in served.engine.registry


def test_only_the_engine_thread_writes_the_registry(served, http, adapter_dirs):
    """Uploads, replaces and deletes parse on worker threads and install on the engine thread: the
    registry is never written from the event loop or a threadpool while a step runs."""
    registry, writers = served.engine.registry, []
    install, remove = registry.install, registry.remove

    def spy(method):
        def recorded(*args, **kwargs):
            writers.append(threading.current_thread().name)
            return method(*args, **kwargs)

        return recorded

    registry.install, registry.remove = spy(install), spy(remove)
    try:
        for replace in ("false", "true"):
            response = http.post(
                "/v1/adapters",
                data={"name": "owned", "replace": replace},
                files=adapter_files(adapter_dirs["gamma"]),
                headers=ADMIN,
            )
            assert response.status_code == 201, response.text
        assert http.delete("/v1/adapters/owned", headers=ADMIN).status_code == 200
    finally:
        registry.install, registry.remove = install, remove
    assert writers and set(writers) == {"loraserve-engine"}, writers
