"""An authorised stream's time alone and under a keyless flood (issue 24's acceptance figure).

Starts `loraserve serve --api-key` on the default model (the repository given by --repo, so an older
checkout can be measured with the same script), then alternates rounds: one greedy 40-token stream
with the key alone, and the same under a flood of keyless clients, each looping POSTs of a 3.7 MB
body, with 100 more keyless connections that send their headers and all but the last byte of a body
and then hold it. On a 2-core machine the flooding clients take CPU the server needs whatever it does
with their requests, so each round also streams under the same flood sent to a control: a bare
socket server (another process) that answers each request's headers with a 401 and closes, as
loraserve now does. Reports per-round times, the median ratios against the stream alone (target:
within 1.5x) and against the control flood (what loraserve's own handling adds), the server's CPU
time during each stream, and its RSS and open file descriptors before and during the flood. Every
address is 127.0.0.1; every loop is bounded in count and time.

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


def control_server(sock: socket.socket) -> None:
    """Answer each connection's headers with a 401 and close, reading nothing of the body."""
    response = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    while True:
        conn, _ = sock.accept()
        with conn:
            conn.settimeout(5)
            head = b""
            try:
                while b"\r\n\r\n" not in head and len(head) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    head += chunk
                conn.sendall(response)
            except OSError:
                pass


def flood_round(url: str, statuses) -> tuple[list, list, list[socket.socket]]:
    """Start the keyless flooders and holders against `url`; the caller stops them."""
    stop = multiprocessing.Event()
    flooders = [multiprocessing.Process(target=flood, args=(url, stop, statuses)) for _ in range(FLOODERS)]
    for process in flooders:
        process.start()
    held = hold(url, HOLDERS)
    time.sleep(1.0)  # the flood is running
    return stop, flooders, held


def end_flood(stop, flooders, held) -> None:
    stop.set()
    for process in flooders:
        process.join(timeout=120)
    for sock in held:
        sock.close()


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


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far (/proc/PID/stat, clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
        alone, flooded, controlled, refused, server_cpu_alone, server_cpu_flooded = [], [], [], [], [], []
        statuses, control_statuses = multiprocessing.Queue(), multiprocessing.Queue()
        control_socket = socket.create_server((LOOPBACK, 0))
        control_url = f"http://{LOOPBACK}:{control_socket.getsockname()[1]}"
        control = multiprocessing.Process(target=control_server, args=(control_socket,), daemon=True)
        control.start()
        memory_alone = rss_and_fds(server.pid)
        memory_flooded = memory_alone
        for _ in range(args.rounds):
            before = cpu_seconds(server.pid)
            alone.append(stream_seconds(url))
            server_cpu_alone.append(cpu_seconds(server.pid) - before)
            flooding = flood_round(url, statuses)
            before = cpu_seconds(server.pid)
            flooded.append(stream_seconds(url))
            server_cpu_flooded.append(cpu_seconds(server.pid) - before)
            memory_flooded = max(memory_flooded, rss_and_fds(server.pid))
            end_flood(*flooding)
            flooding = flood_round(control_url, control_statuses)
            controlled.append(stream_seconds(url))
            end_flood(*flooding)
            while not statuses.empty():
                refused.append(statuses.get())
        control.kill()
    finally:
        server.kill()
        server.wait(timeout=30)
    ratios = [f / a for a, f in zip(alone, flooded)]
    own = [f / c for c, f in zip(controlled, flooded)]
    result = {
        "cpu": cpu_model_name(),
        "repo": str(args.repo),
        "stream_seconds_alone": alone,
        "stream_seconds_flooded": flooded,
        "stream_seconds_control_flood": controlled,
        "ratio_per_round": ratios,
        "ratio_to_control_per_round": own,
        "median_ratio_to_control": statistics.median(own),
        "median_ratio_control_to_alone": statistics.median(c / a for a, c in zip(alone, controlled)),
        "median_ratio": statistics.median(ratios),
        "first_round_ratio": ratios[0],
        # What the server itself spent while the stream ran: the flood's share of its CPU, apart from
        # what the flooding clients take from a 2-core machine they share with it.
        "server_cpu_seconds_alone": server_cpu_alone,
        "server_cpu_seconds_flooded": server_cpu_flooded,
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
