"""The allocator settings `loraserve serve` makes (server/engine/host_memory.py), read back from
glibc's own report (`malloc_info`) in a fresh process, since an arena cap only acts on threads
started after it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.engine import host_memory

pytestmark = pytest.mark.skipif(not host_memory._GLIBC, reason="glibc's allocator only")

THREADS = 8
_SCRIPT = """
import ctypes, sys, threading
from server.engine.host_memory import limit_arenas
if sys.argv[1] == "capped":
    limit_arenas(2)
libc = ctypes.CDLL(None)
libc.fopen.restype = libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
barrier = threading.Barrier({threads})
def work():  # each thread's first malloc picks its arena; all alive at once, none can share by exiting
    block = libc.malloc(1 << 16)
    barrier.wait()
    libc.free(block)
threads = [threading.Thread(target=work) for _ in range({threads})]
for thread in threads: thread.start()
for thread in threads: thread.join()
report = libc.fopen(sys.argv[2].encode(), b"w")
libc.malloc_info(0, report)
libc.fclose(report)
"""


def _arenas(mode: str, tmp_path: Path) -> int:
    report = tmp_path / f"{mode}.xml"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    script = _SCRIPT.format(threads=THREADS)
    subprocess.run([sys.executable, "-c", script, mode, str(report)], check=True, env=env, timeout=60)
    return report.read_text().count("<heap nr=")


def test_serve_caps_the_allocator_at_two_arenas(tmp_path):
    assert _arenas("uncapped", tmp_path) > 2, "threads did not spread over arenas: the test shows nothing"
    assert _arenas("capped", tmp_path) <= 2


_HUGE_SCRIPT = """
import sys
from server.engine.host_memory import allocate_on_huge_pages
if sys.argv[1] == "advised":
    allocate_on_huge_pages()
import torch
tensor = torch.ones(8 << 20)  # 32 MB: past torch's 2 MB threshold
address, inside = tensor.data_ptr(), False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if not head.endswith(":"):
        lo, hi = (int(part, 16) for part in head.split("-"))
        inside = lo <= address < hi
    elif inside and head == "THPeligible:":
        print(line.split()[1])
"""


def _eligible(mode: str, **env_overrides: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env_overrides
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    result = subprocess.run(
        [sys.executable, "-c", _HUGE_SCRIPT, mode], check=True, env=env, timeout=120, capture_output=True, text=True
    )
    return result.stdout.strip()


@pytest.mark.skipif(
    not Path("/sys/kernel/mm/transparent_hugepage/enabled").is_file()
    or "[madvise]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
    reason="shows a difference only where THP is `madvise` (with `always` every mapping is eligible)",
)
def test_serve_has_torch_advise_huge_pages_unless_the_operator_said_otherwise():
    assert _eligible("plain") == "0"
    assert _eligible("advised") == "1"
    assert _eligible("advised", THP_MEM_ALLOC_ENABLE="0") == "0"
