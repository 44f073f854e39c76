"""An authorised stream's time alone and under a keyless flood (issue 24's acceptance figure).

Starts `loraserve serve --api-key` on the default model (the repository given by --repo, so an older
checkout can be measured with the same script), then alternates rounds: one greedy 40-token stream
with the key alone, and the same under a flood of keyless clients, each looping POSTs of a 3.7 MB
body, with 100 more keyless connections that send their headers and all but the last byte of a body
and then hold it. Reports per-round times, the median ratio (target: within 1.5x), and the server's
RSS and open file descriptors before and during the flood. Every address is 127.0.0.1; every loop
is bounded in count and time.

    .venv/bin/python benchmarks/keyless_flood.py [--rounds 5] [--repo .] [--out benchmarks/results/keyless_flood.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from adapters.backends.cpu import cpu_model_name  # noqa: E402
from support.servers import LOOPBACK, free_port, server_env, wait_ready  # noqa: E402

KEY = "bench-key"
BODY_BYTES = 3_700_000
FLOODERS, HOLDERS = 3, 100
STREAM = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time", "max_tokens": 40, "stream": True}


def stream_seconds(url: str) -> float:
    body = {**STREAM, "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300
    ) as response:
        assert response.status_code == 200, response.read()
        for _ in response.iter_lines():
            pass
    return time.perf_counter() - started


def flood(url: str, stop, statuses) -> None:
    """One keyless client (its own process: the measured stream's client shares no GIL with it)."""
    payload = b'{"model": "x", "prompt": "' + b"x" * BODY_BYTES + b'"}'
    deadline = time.monotonic() + 600
    while not stop.is_set() and time.monotonic() < deadline:
        try:
            statuses.put(httpx.post(f"{url}/v1/completions", content=payload, timeout=60).status_code)
        except httpx.TransportError:
            statuses.put(0)  # closed while still sending: the server would not read it


def hold(url: str, count: int) -> list[socket.socket]:
    """`count` keyless connections that send headers and all but the last byte of a 1 MB body."""
    host, port = url.removeprefix("http://").split(":")
    held = []
    for _ in range(count):
        try:
            sock = socket.create_connection((host, int(port)), timeout=10)
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            sock.sendall(b"Content-Length: 1048576\r\n\r\n")
            sock.settimeout(0.2)
            try:
                sock.sendall(b"x" * (1048576 - 1))
            except OSError:
                pass  # refused and closed before the body: what the fix does
            held.append(sock)
        except OSError:
            break
    return held


def rss_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss_kb >> 10, len(os.listdir(f"/proc/{pid}/fd"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/keyless_flood.json"))
    args = parser.parse_args()
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log = tempfile.NamedTemporaryFile(prefix="keyless-flood-", suffix=".log", delete=False)
    command = [sys.executable, "-m", "server.http.cli", "serve", "--host", LOOPBACK, "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--api-key", KEY, "--kernel-choice", "packed"],
        cwd=args.repo,
        env=server_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(url, lambda: server.poll() is None, lambda: Path(log.name).read_text()[-2000:])
        stream_seconds(url)  # warm-up
        alone, flooded, refused = [], [], []
        statuses = multiprocessing.Queue()
        memory_alone = rss_and_fds(server.pid)
        memory_flooded = memory_alone
        for _ in range(args.rounds):
            alone.append(stream_seconds(url))
            stop = multiprocessing.Event()
            threads = [multiprocessing.Process(target=flood, args=(url, stop, statuses)) for _ in range(FLOODERS)]
            for thread in threads:
                thread.start()
            held = hold(url, HOLDERS)
            time.sleep(1.0)  # the flood is running
            flooded.append(stream_seconds(url))
            memory_flooded = max(memory_flooded, rss_and_fds(server.pid))
            stop.set()
            for thread in threads:
                thread.join(timeout=120)
            while not statuses.empty():
                refused.append(statuses.get())
            for sock in held:
                sock.close()
    finally:
        server.kill()
        server.wait(timeout=30)
    ratios = [f / a for a, f in zip(alone, flooded)]
    result = {
        "cpu": cpu_model_name(),
        "repo": str(args.repo),
        "stream_seconds_alone": alone,
        "stream_seconds_flooded": flooded,
        "ratio_per_round": ratios,
        "median_ratio": statistics.median(ratios),
        "first_round_ratio": ratios[0],
        "flood_requests": len(refused),
        "flood_statuses": {str(s): refused.count(s) for s in sorted(set(refused))},
        "rss_mib_fds_alone": memory_alone,
        "rss_mib_fds_flooded": memory_flooded,
    }
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
