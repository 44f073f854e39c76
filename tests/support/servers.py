"""The one harness for tests that run whole servers: `loraserve serve` as a child process, or an
in-process app under uvicorn on a background thread. Loopback only; every wait is bounded in count
and time, and every process or thread started here is stopped in a `finally`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from server.http.protocol import uvicorn_options

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 180.0  # a cold start imports torch and loads the model on a busy 2-core machine
POLL_INTERVAL = 0.2
LORASERVE_BIN = Path(sys.executable).with_name("loraserve")


def bound_socket() -> socket.socket:
    """A socket bound to a free loopback port, so no other process can take the port meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    return sock


def free_port() -> int:
    with bound_socket() as sock:
        return sock.getsockname()[1]


def wait_ready(
    url: str, is_alive: Callable[[], bool], describe: Callable[[], str] = str, timeout: float = READY_TIMEOUT
) -> None:
    """Poll GET /ready until 200; fail early if the server died or reported a load failure."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / POLL_INTERVAL) + 1):
        if time.monotonic() > deadline:
            break
        assert is_alive(), f"the server at {url} died before it was ready\n{describe()}"
        try:
            response = httpx.get(f"{url}/ready", timeout=5.0)
            if response.status_code == 200:
                return
            assert "load_failed" not in response.text, f"the model failed to load: {response.text}"
        except httpx.TransportError:
            pass  # not listening yet
        time.sleep(POLL_INTERVAL)  # the server may be another process: only /ready can tell it is up
    raise AssertionError(f"{url} not ready after {timeout} s\n{describe()}")


# `loraserve serve` as a child process
@dataclass
class ServerProcess:
    """A running `loraserve serve`: its URL, the process, and its log file (stdout and stderr)."""

    url: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, num_chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]


def server_env() -> dict[str, str]:
    """The test's environment without LORASERVE_* settings (only flags configure the child), keeping
    the model cache; one torch thread, since spinning OpenMP threads crawl on a busy 2-core machine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_") or k == "LORASERVE_CACHE_DIR"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def start_process(log_dir: Path, *flags: str) -> ServerProcess:
    """Start `loraserve serve --host 127.0.0.1 --port <free> FLAGS` in its own process group, without
    waiting; the caller stops it (see `serve_process`)."""
    port = free_port()
    log_path = log_dir / f"loraserve-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [str(LORASERVE_BIN), "serve", "--host", LOOPBACK, "--port", str(port), *flags],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=server_env(),
            start_new_session=True,
        )
    return ServerProcess(f"http://{LOOPBACK}:{port}", process, log_path)


@contextmanager
def serve_process(log_dir: Path, *flags: str, graceful: bool = False) -> Iterator[ServerProcess]:
    """`start_process`, then wait until /ready. On the way out a still running server is stopped:
    SIGTERM and a bounded wait when `graceful`, SIGKILL to its group otherwise (or after that wait)."""
    server = start_process(log_dir, *flags)
    process = server.process
    try:
        wait_ready(server.url, lambda: process.poll() is None, server.log_tail)
        yield server
    finally:
        if graceful and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


# An in-process app under uvicorn
@contextmanager
def serve_in_thread(app: FastAPI, stop_timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on a free loopback port from a background thread until the block ends; yields the URL."""
    sock = bound_socket()
    url = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
    config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=5, **uvicorn_options(app.state.settings)
    )  # the limits `loraserve serve` sets
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{url}", daemon=True)
    thread.start()
    try:
        wait_ready(url, thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(stop_timeout)
        sock.close()
        assert not thread.is_alive(), f"the server at {url} did not stop"
