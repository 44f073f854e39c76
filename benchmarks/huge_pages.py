"""One-row matmuls over the default model's weights on 4 KB pages against 2 MB huge pages.

A one-stream decode token streams every weight once, so how fast memory streams into the cores
bounds it. This times the default model's 121 one-row matmul weights (538 MB in fp32, fused groups
concatenated: one_row_matmuls.py's set) in one process, the same values on small pages (a private
mapping advised MADV_NOHUGEPAGE, what the model file's 4 KB page-cache mapping gave before
adapters/huge_pages.py) and on huge pages (adapters/huge_pages.huge_page_copies, what
load_base_model gives now), in turn round after round: F.linear (MKL) and a plain sum of the same
bytes. Records the CPU, the host's THP mode and how much of the process sits on huge pages.

Usage: python benchmarks/huge_pages.py [--rounds 9] [--out PATH]
"""

from __future__ import annotations

import argparse
import mmap
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from one_row_matmuls import model_weights, write_report

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.huge_pages import huge_page_copies  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "huge_pages.json"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def small_page_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy in its own private mapping that the kernel is told never to back with huge pages."""
    area = mmap.mmap(-1, tensor.nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_NOHUGEPAGE)
    flat = torch.frombuffer(area, dtype=torch.uint8)
    return flat.view(tensor.dtype).view(tensor.shape).copy_(tensor)


def anon_huge_kb() -> int:
    line = next(line for line in open("/proc/self/smaps_rollup") if line.startswith("AnonHugePages:"))
    return int(line.split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    weights = model_weights()
    nbytes = sum(w.nbytes for w in weights)
    pages = {"4 KB": [small_page_copy(w) for w in weights], "2 MB": huge_page_copies(weights)}
    del weights
    xs = [torch.randn(1, w.shape[1]) for w in pages["4 KB"]]
    runs = {
        (page, kernel): run
        for page, ws in pages.items()
        for kernel, run in (
            ("F.linear", lambda ws=ws: [F.linear(x, w) for x, w in zip(xs, ws)]),
            ("sum", lambda ws=ws: [w.sum() for w in ws]),
        )
    }
    ms = {key: [] for key in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()  # fault every page in
        for _ in range(args.rounds):
            for key, run in runs.items():
                started = time.perf_counter()
                run()
                ms[key].append((time.perf_counter() - started) * 1e3)
    results = {}
    for (page, kernel), times in ms.items():
        median = statistics.median(times)
        results.setdefault(page, {})[kernel] = {"ms": round(median, 2), "gb_per_s": round(nbytes / median / 1e6, 1)}
        print(f"{page:5} {kernel:9} {median:7.2f} ms  {nbytes / median / 1e6:5.1f} GB/s", flush=True)
    thp_mode = THP_MODE.read_text().strip() if THP_MODE.is_file() else None
    facts = {"thp_mode": thp_mode, "anon_huge_pages_mb": round(anon_huge_kb() / 1024)}
    facts["weights_mb"] = round(nbytes / 1e6, 1)
    write_report(args.out, args.rounds, results, **facts)


if __name__ == "__main__":
    main()
