"""`loraserve` as a user runs it: serve in a subprocess, upload with the CLI, generate, SIGTERM,
start again on the same store, and the adapter is still there and answers the same."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from support.http import reference_text
from support.servers import serve_process

pytestmark = pytest.mark.real_model

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "loraserve"
COMMAND = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "server.http.cli"]
PROMPT = "The capital of France is"
START_TIMEOUT = 240.0  # importing torch and loading the model on a busy 2-core machine
STOP_TIMEOUT = 60.0


def _env() -> dict[str, str]:
    """No LORASERVE_* from the caller's shell; one thread, as the in-process tests use."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORASERVE_")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@contextmanager
def loraserve_serve(store: Path, log: Path):
    """`loraserve serve` on a free port with `store`; stopped with SIGTERM when the block ends."""
    flags = ("--adapter-store", str(store), "--log-level", "warning", "--shutdown-timeout", "10")
    with serve_process(log.parent, *flags, graceful=True) as server:
        yield server.url, server.process


def _cli(url: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*COMMAND, *args, "--url", url], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180
    )


def _complete(url: str, model: str) -> str:
    done = _cli(url, "complete", "--model", model, "--no-stream", "--max-tokens", "6", PROMPT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_serve_upload_restart_keeps_the_adapter(tmp_path, adapter_dirs):
    store, log = tmp_path / "store", tmp_path / "serve.log"
    with loraserve_serve(store, log) as (url, process):
        uploaded = _cli(url, "adapters", "upload", "cli-alpha", str(adapter_dirs["alpha"]))
        assert uploaded.returncode == 0, uploaded.stderr
        info = json.loads(uploaded.stdout)
        assert (info["name"], info["rank"], info["persisted"]) == ("cli-alpha", 8, True)
        before = _complete(url, "cli-alpha")
        streamed = _cli(url, "complete", "--model", "cli-alpha", "--max-tokens", "6", PROMPT)
        assert streamed.returncode == 0 and streamed.stdout == before

        process.send_signal(signal.SIGTERM)
        assert process.wait(STOP_TIMEOUT) == 0, log.read_text()[-4000:]
    assert before == reference_text(adapter_dirs, PROMPT, "alpha", 6) + "\n"
    assert sorted(p.name for p in (store / "cli-alpha").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    with loraserve_serve(store, log) as (url, _):
        listed = _cli(url, "adapters", "list")
        assert listed.returncode == 0, listed.stderr
        assert [(a["name"], a["persisted"]) for a in json.loads(listed.stdout)] == [("cli-alpha", True)]
        assert _complete(url, "cli-alpha") == before

        missing = _cli(url, "complete", "--model", "nope", "--no-stream", PROMPT)
        assert missing.returncode == 1 and "error:" in missing.stderr and "nope" in missing.stderr
        removed = _cli(url, "adapters", "rm", "cli-alpha")
        assert removed.returncode == 0 and "deleted cli-alpha" in removed.stdout
        assert json.loads(_cli(url, "adapters", "list").stdout) == []
    assert not (store / "cli-alpha").exists()
