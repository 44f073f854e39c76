"""Torch work off the engine thread leaves no OpenMP team behind (server/engine/torch_threads.py).

Parsing an upload or a resolved adapter, analysing one, and filling grammar masks once ran on
pooled threads, which kept a GNU OpenMP team alive after them: with more OpenMP threads than CPUs
their workers sleep between parallel regions, and every later decode step of the server paid for it
(one stream 23.9 -> 19.9 tokens/s after one upload, AMD EPYC, 2 cores). Counted here as the
process's native threads (OpenMP's workers are not Python threads).
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest
import torch

from server.engine.model_loader import load_base_model
from server.http.settings import Settings
from support.http import adapter_files, serve

pytestmark = pytest.mark.real_model

PROMPT = "Once upon a time"


def _native_threads() -> int:
    """OS threads of this process that Python did not start: OpenMP's workers among them."""
    return len(os.listdir("/proc/self/task")) - len(threading.enumerate())


def _settled(expected: int, timeout: float = 10.0) -> int:
    """The native thread count once it is down to `expected` (a thread's end is not instant), or
    what it is after `timeout`."""
    deadline = time.monotonic() + timeout
    while (count := _native_threads()) > expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


@pytest.fixture
def two_torch_threads():
    """The suite runs torch on one thread (conftest.py), where no OpenMP team ever forms; a server
    runs on every core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_uploads_resolutions_analyses_and_grammars_leave_no_openmp_team_behind(
    tmp_path, make_peft_adapter, two_torch_threads
):
    # gate/up's B and down's A hold 1536 x 24 values, past ATen's grain size: parsing runs parallel ops
    wide = make_peft_adapter(load_base_model().model, tmp_path / "tree" / "wide", r=24, target_modules="all-linear")
    settings = Settings(adapter_source=[str(tmp_path / "tree")])
    with serve(settings) as served, httpx.Client(base_url=served.url, timeout=120) as http:
        body = {"model": served.state.model_name, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        assert http.post("/v1/completions", json=body).status_code == 200  # the engine's own team exists
        before = _native_threads()
        for name in ("uploaded", "uploaded-again"):
            assert http.post("/v1/adapters", data={"name": name}, files=adapter_files(wide)).status_code == 201
        assert http.post("/v1/completions", json={**body, "model": "wide"}).status_code == 200  # resolved
        assert http.get("/v1/adapters/uploaded/analysis").status_code == 200  # float64 SVDs
        # 24 rows constrained to JSON: their grammar masks are filled off the engine thread
        json_rows = {**body, "prompt": [PROMPT, PROMPT], "n": 12, "response_format": {"type": "json_object"}}
        assert http.post("/v1/completions", json=json_rows).status_code == 200
        assert _settled(before) == before
