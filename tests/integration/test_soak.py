"""Soak: mixed traffic against two `loraserve serve` replicas on one adapter store, then a check
that nothing leaked and every answer was right.

Traffic, from several client threads at once, for LORASERVE_SOAK_SECONDS (60 in `make test`, 600
in `make soak`): greedy completions on stable adapters (each equal to an engine-only reference),
compositions through the `adapters` field, streams the client drops after a few chunks, and a
churn of uploads, replaces and deletes of other names, each through a random replica, with
completions on them from the other replica; and hostile traffic that must change nothing: grammar
bombs (a 3,000-link `$ref` chain, a 3,000-rule Lark chain, a regex past the lexer's limits), lone
surrogates in prompts, and keyless clients flooding 3.7 MB bodies. Afterwards both replicas are idle and hold nothing
(no running or waiting request, no KV reserved), and their RSS and open file descriptors, taken
idle after a warm-up and again at the end (after the engine's idle trim), have not grown past the
noise of the allocator.
Figures go to the log (and docs/benchmarks.md quotes a `make soak` run)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.backends.cpu import cpu_model_name
from server.engine.async_engine import IDLE_TRIM_SECONDS
from support.http import adapter_files, reference_text
from support.servers import serve_process

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SECONDS = float(os.environ.get("LORASERVE_SOAK_SECONDS", "60"))
CLIENTS = 6
PROMPTS = ["The capital of France is", "Water boils at", "One, two, three,", "My favourite colour is"]
MAX_TOKENS = 8
STABLE = ("alpha", "beta")
API_KEY = "soak-key"
FLOOD_BYTES = 3_700_000
CHAIN = 3000  # links past the depth that crashed the grammar library inside the server
_REF_CHAIN = {
    "$defs": {**{f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(CHAIN)}, f"d{CHAIN}": {"type": "string"}},
    "$ref": "#/$defs/d0",
}
GRAMMAR_BOMBS = [
    {"json": _REF_CHAIN},
    {"grammar": "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(CHAIN)) + f'\nr{CHAIN}: "x"'},
    {"regex": "(a{1000}){1000}"},
]
RSS_SLACK_BYTES = 96 << 20  # allocator and cache noise on a 135M model: growth past this is a leak
FD_SLACK = 16


def _rss_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def _idle_rss_and_fds(servers) -> list[tuple[int, int]]:
    """Each replica's RSS and open descriptors once idle long enough to have handed freed memory back."""
    time.sleep(3 * IDLE_TRIM_SECONDS)
    return [_rss_and_fds(s.process.pid) for s in servers]


def _gauge(url: str, name: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text)  # open without a key
    return sum(s.value for f in families for s in f.samples if s.name == name)


class Traffic:
    """The client threads' shared tally; every failure is recorded with what was asked."""

    def __init__(self, urls: list[str], adapter_dirs: dict[str, Path]):
        self.urls, self.adapter_dirs = urls, adapter_dirs
        self.counts: dict[str, int] = {}
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.churn_weights = {name: adapter_files(adapter_dirs[name]) for name in ("gamma", "alpha")}

    def tally(self, kind: str, failure: str | None = None) -> None:
        with self.lock:
            self.counts[kind] = self.counts.get(kind, 0) + 1
            if failure:
                self.failures.append(f"{kind}: {failure}")

    def run(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        actions = [self.complete, self.complete, self.compose, self.drop_stream, self.churn, self.hostile]
        # Idle connections dropped well before the server's keep-alive timeout (5 s, httpx's default
        # expiry too): a request sent on one just as the server closes it is reset (ECONNRESET), the
        # race a client avoids by expiring first. The idle baseline between phases outlasts both.
        limits = httpx.Limits(keepalive_expiry=1.0)
        with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {API_KEY}"}, limits=limits) as http:
            while time.monotonic() < deadline:
                try:
                    rng.choice(actions)(http, rng)
                except Exception as exc:  # noqa: BLE001 - tallied, then asserted on at the end
                    self.tally("exception", repr(exc))

    def complete(self, http: httpx.Client, rng: random.Random) -> None:
        adapter, prompt = rng.choice(STABLE), rng.choice(PROMPTS)
        text = self._text(http, rng.choice(self.urls), adapter, prompt)
        expected = reference_text(self.adapter_dirs, prompt, adapter, MAX_TOKENS)
        self.tally("complete", None if text == expected else f"{adapter} {prompt!r}: {text!r} != {expected!r}")

    def compose(self, http: httpx.Client, rng: random.Random) -> None:
        body = {
            "model": "SmolLM2-135M-Instruct",
            "prompt": rng.choice(PROMPTS),
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "adapters": [{"name": "alpha", "scale": 0.5}, {"name": "beta", "scale": 0.5}],
        }
        answer = http.post(f"{rng.choice(self.urls)}/v1/completions", json=body)
        self.tally("compose", None if answer.status_code == 200 else answer.text)

    def drop_stream(self, http: httpx.Client, rng: random.Random) -> None:
        body = {
            "model": rng.choice(STABLE),
            "prompt": rng.choice(PROMPTS),
            "max_tokens": 64,
            "stream": True,
            "ignore_eos": True,
        }
        with http.stream("POST", f"{rng.choice(self.urls)}/v1/completions", json=body) as response:
            for index, _ in enumerate(response.iter_lines()):
                if index >= 2:
                    break  # the client leaves early; the server must free what the request held
        self.tally("dropped_stream")

    def churn(self, http: httpx.Client, rng: random.Random) -> None:
        name, weights = f"churn-{rng.randrange(3)}", rng.choice(list(self.churn_weights))
        upload_url, read_url = rng.sample(self.urls, 2)
        action = rng.choice(["upload", "upload", "delete"])
        if action == "delete":
            response = http.delete(f"{upload_url}/v1/adapters/{name}")
            self.tally("delete", None if response.status_code in (200, 404) else response.text)
            return
        response = http.post(
            f"{upload_url}/v1/adapters", data={"name": name, "replace": "true"}, files=self.churn_weights[weights]
        )
        self.tally("upload", None if response.status_code == 201 else response.text)
        prompt = rng.choice(PROMPTS)
        answer = http.post(
            f"{read_url}/v1/completions",
            json={"model": name, "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True},
        )
        if answer.status_code == 404:  # another client deleted it meanwhile
            self.tally("churn_read_gone")
            return
        text = answer.json()["choices"][0]["text"] if answer.status_code == 200 else answer.text
        allowed = {reference_text(self.adapter_dirs, prompt, w, MAX_TOKENS) for w in self.churn_weights}
        self.tally("churn_read", None if text in allowed else f"{name} {prompt!r}: {text!r}")

    def hostile(self, http: httpx.Client, rng: random.Random) -> None:
        """One attack that must be refused and change nothing for anyone else."""
        url, attack = rng.choice(self.urls), rng.choice(["grammar_bomb", "surrogate", "keyless_flood"])
        if attack == "keyless_flood":  # no key, 3.7 MB: refused from the headers, the body never read
            try:
                response = httpx.post(f"{url}/v1/completions", content=b"x" * FLOOD_BYTES, timeout=60)
                failure = None if response.status_code == 401 else f"{response.status_code} {response.text[:200]}"
            except httpx.TransportError:
                failure = None  # the server closed the connection while the client was still sending
            self.tally(attack, failure)
            return
        if attack == "grammar_bomb":
            body = json.dumps({"model": STABLE[0], "prompt": "x", "structured_outputs": rng.choice(GRAMMAR_BOMBS)})
        else:
            body = json.dumps({"model": STABLE[0], "prompt": "a lone surrogate: \ud800"})  # escaped by ensure_ascii
        response = http.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"})
        self.tally(attack, None if response.status_code == 400 else f"{response.status_code} {response.text[:200]}")

    def _text(self, http: httpx.Client, url: str, adapter: str, prompt: str) -> str:
        answer = http.post(
            f"{url}/v1/completions",
            json={"model": adapter, "prompt": prompt, "temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True},
        )
        return answer.json()["choices"][0]["text"] if answer.status_code == 200 else f"HTTP {answer.status_code}"


def test_two_replicas_survive_mixed_traffic_without_leaks(adapter_dirs, tmp_path):
    store = tmp_path / "store"
    flags = [
        "--api-key",
        API_KEY,
        "--adapter-store",
        str(store),
        "--kernel-choice",
        "packed",
        "--max-cpu-loras",
        "2",
        "--kv-cache-tokens",
        "4096",
        "--max-num-seqs",
        "8",
    ]
    for name in STABLE:
        flags += ["--adapter", f"{name}={adapter_dirs[name]}"]
    with serve_process(tmp_path, *flags) as first, serve_process(tmp_path, *flags) as second:
        servers = [first, second]
        traffic = Traffic([s.url for s in servers], adapter_dirs)
        # Long enough that every kind of traffic has reached both replicas before the baseline is taken.
        warm_deadline = time.monotonic() + max(SECONDS / 3, 20)
        _drive(traffic, warm_deadline, seed=0)
        for server in servers:  # one-time costs (the grammar library's token table) before the baseline
            _warm_grammars(server.url)
        warm = _idle_rss_and_fds(servers)
        _drive(traffic, time.monotonic() + SECONDS, seed=1000)
        for server in servers:  # idle and holding nothing
            assert _gauge(server.url, "vllm:num_requests_running") == 0
            assert _gauge(server.url, "vllm:num_requests_waiting") == 0
        end = _idle_rss_and_fds(servers)
    figures = {
        "cpu": cpu_model_name(),
        "seconds": SECONDS,
        "counts": traffic.counts,
        "rss_mb_warm_end": [(w[0] >> 20, e[0] >> 20) for w, e in zip(warm, end)],
        "fds_warm_end": [(w[1], e[1]) for w, e in zip(warm, end)],
    }
    print("soak figures:", json.dumps(figures))
    Path(os.environ.get("LORASERVE_SOAK_REPORT", tmp_path / "soak.json")).write_text(json.dumps(figures, indent=1))
    assert not traffic.failures, traffic.failures[:10]
    assert traffic.counts.get("complete", 0) and traffic.counts.get("churn_read", 0)
    assert traffic.counts.get("grammar_bomb", 0) and traffic.counts.get("keyless_flood", 0)
    for (warm_rss, warm_fds), (end_rss, end_fds) in zip(warm, end):
        assert end_rss <= warm_rss + RSS_SLACK_BYTES, figures
        assert end_fds <= warm_fds + FD_SLACK, figures


def _warm_grammars(url: str) -> None:
    """Each grammar bomb once and one grammar that compiles, on one replica: the grammar library's
    token table and lexers are built once per process (~95 MB, then flat however many bombs follow),
    which the random warm-up traffic may or may not have reached."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(timeout=120, headers=headers) as http:
        for structured in [*GRAMMAR_BOMBS, {"choice": ["yes", "no"]}]:
            body = {"model": STABLE[0], "prompt": "x", "max_tokens": 2, "structured_outputs": structured}
            http.post(f"{url}/v1/completions", json=body)


def _drive(traffic: Traffic, deadline: float, seed: int) -> None:
    threads = [
        threading.Thread(target=traffic.run, args=(seed + i, deadline), name=f"soak-{i}") for i in range(CLIENTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=deadline - time.monotonic() + 300)
        assert not thread.is_alive(), "a soak client hung"
