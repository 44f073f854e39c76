"""SIGTERM on a real `loraserve serve` process: what Kubernetes does to a pod on scale-down or rollout.

The contract (Dockerfile, deploy/base/deployment.yaml): stop accepting new connections, let every
in-flight request finish in full within LORASERVE_SHUTDOWN_TIMEOUT, then exit 0.
"""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest

from support.servers import serve_process, start_process

pytestmark = pytest.mark.real_model

BASE = "SmolLM2-135M-Instruct"
MAX_TOKENS = 48  # many engine steps: still running when SIGTERM arrives
REQUEST_TIMEOUT = 180.0
IN_FLIGHT_TIMEOUT = 90.0
EXIT_TIMEOUT = 120.0


class Completion(threading.Thread):
    """One greedy completion on its own thread; streamed or not. Records what came back."""

    def __init__(self, url: str, prompt: str, stream: bool):
        super().__init__(name=f"completion-{prompt}", daemon=True)
        self.url, self.stream = url, stream
        self.body = {
            "model": BASE,
            "prompt": prompt,
            "max_tokens": MAX_TOKENS,
            "temperature": 0.0,
            "ignore_eos": True,
            "stream": stream,
        }
        if stream:
            self.body["stream_options"] = {"include_usage": True}
        self.first_chunk = threading.Event()
        self.status: int | None = None
        self.events: list[str] = []  # the `data:` payloads of a stream
        self.response: dict | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with httpx.Client(timeout=REQUEST_TIMEOUT) as client:
                if self.stream:
                    self._run_stream(client)
                else:
                    response = client.post(f"{self.url}/v1/completions", json=self.body)
                    self.status, self.response = response.status_code, response.json()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def _run_stream(self, client: httpx.Client) -> None:
        with client.stream("POST", f"{self.url}/v1/completions", json=self.body) as response:
            self.status = response.status_code
            for line in response.iter_lines():
                if line.startswith("data:"):
                    self.events.append(line[len("data:") :].strip())
                    self.first_chunk.set()

    @property
    def is_done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    def completion_tokens(self) -> int:
        if not self.stream:
            return self.response["usage"]["completion_tokens"]
        chunks = [json.loads(event) for event in self.events if event != "[DONE]"]
        usage = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
        assert len(usage) == 1, f"expected one usage chunk: {self.events[-3:]}"
        return usage[0]["completion_tokens"]


def num_running(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5.0).text
    match = re.search(r"^vllm:num_requests_running(?:\{\})? ([0-9.eE+-]+)$", text, re.MULTILINE)
    assert match, "vllm:num_requests_running is missing from /metrics"
    return float(match.group(1))


def wait_in_flight(url: str, requests: list[Completion]) -> None:
    """Until every stream has sent a chunk and the engine runs all the requests (bounded)."""
    deadline = time.monotonic() + IN_FLIGHT_TIMEOUT
    for _ in range(int(IN_FLIGHT_TIMEOUT / 0.1)):
        streamed = all(r.first_chunk.is_set() for r in requests if r.stream)
        if streamed and num_running(url) >= len(requests):
            return
        failed = [r.error for r in requests if r.error is not None]
        assert not failed, f"a request failed before SIGTERM: {failed}"
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)  # the server is another process: polling its API is the only way to see it
    raise AssertionError(f"the {len(requests)} requests were not all running within {IN_FLIGHT_TIMEOUT} s")


def refused_while_draining(url: str, process, timeout: float = 30.0) -> bool:
    """Whether a new connection is refused while the process is still alive (draining), bounded."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.1)):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        try:
            httpx.get(f"{url}/health", timeout=2.0, headers={"Connection": "close"})
        except httpx.ConnectError:
            return process.poll() is None
        except httpx.TransportError:
            pass  # accepted just before the listener closed, then dropped: try again
        time.sleep(0.1)  # another process: polled, bounded in count and time
    return False


def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path):
    with serve_process(tmp_path, "--shutdown-timeout", "60") as server:
        requests = [
            Completion(server.url, "Once upon a time", stream=True),
            Completion(server.url, "The three rules of cooking are", stream=True),
            Completion(server.url, "List the planets:", stream=False),
        ]
        for request in requests:
            request.start()
        wait_in_flight(server.url, requests)
        unfinished = sum(not r.is_done for r in requests if r.stream)
        server.process.send_signal(signal.SIGTERM)  # what the kubelet sends the container's PID 1

        refused = refused_while_draining(server.url, server.process)
        for request in requests:
            request.join(REQUEST_TIMEOUT)
        returncode = server.process.wait(timeout=EXIT_TIMEOUT)
        log = server.log_tail()

    assert unfinished == 2, "the streams finished before SIGTERM: the test proved nothing"
    for request in requests:
        assert not request.is_alive(), f"{request.name} still waiting after {REQUEST_TIMEOUT} s"
        assert request.error is None, f"{request.name} failed: {request.error!r}\n{log}"
        assert request.status == 200, f"{request.name}: HTTP {request.status}"
        assert request.completion_tokens() == MAX_TOKENS, request.name
        if request.stream:
            assert request.is_done, f"{request.name} ended without [DONE]: {request.events[-2:]}"
        else:
            assert request.response["choices"][0]["finish_reason"] == "length"
    assert refused, "new connections were still accepted while in-flight requests drained"
    assert "timeout graceful shutdown exceeded" not in log
    assert returncode == 0, f"exit status {returncode} after SIGTERM\n{log}"


@pytest.mark.parametrize(
    "flags, reason",
    [
        (("--adapter", "broken=/nonexistent/adapter"), "does not exist"),
        (("--model", "/nonexistent/model"), "/nonexistent/model"),
    ],
)
def test_a_server_that_cannot_start_exits_non_zero_with_the_reason(tmp_path, flags, reason):
    """A supervisor restarts (or reports) a failed pod only if the process exits: it must not sit
    answering 503 forever."""
    server = start_process(tmp_path, *flags)
    try:
        code = server.process.wait(timeout=EXIT_TIMEOUT)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)
    log = server.log_tail()
    assert code == 1, log
    assert "startup failed" in log and reason in log
