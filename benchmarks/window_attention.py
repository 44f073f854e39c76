"""CPU cost of a windowed layer's attention against a full layer's, at a long context (docs/models.md).

The pool keeps every token of a windowed layer (docs/models.md#sliding-windows); what the window
saves is the keys attention reads. This times `attend` (server/engine/attention.py) for one layer of
a 7B-class shape (32 query heads, 8 KV heads of 128) on a decode step of 8 sequences and on one
256-token prompt chunk, each at 4,096 tokens of context, with a window of 512 and without one.
Each round times both layers back to back (process CPU time, one torch thread); the figure is the
median of the rounds' ratios, so another process sharing the machine moves it little.

Usage: python benchmarks/window_attention.py [--rounds 15] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters.backends.cpu import cpu_model_name  # noqa: E402 - after the sys.path line above
from server.engine.attention import KVStep, SeqSlice, attend  # noqa: E402
from server.engine.kv_cache import KVCache  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "window_attention.json"
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CONTEXT, WINDOW, CHUNK, DECODE_ROWS = 4096, 512, 256, 8


def make_step(cache: KVCache, num_new: list[int]) -> KVStep:
    """Sequences of CONTEXT tokens each, side by side in the pool, computing their last `num_new`."""
    seqs, write, row = [], [], 0
    for i, new in enumerate(num_new):
        kv_start = i * CONTEXT
        seqs.append(SeqSlice(row, new, kv_start, CONTEXT))
        write += range(kv_start + CONTEXT - new, kv_start + CONTEXT)
        row += new
    return KVStep(cache, seqs, torch.tensor(write))


def seconds(layer: int, step: KVStep, rows: int) -> float:
    q = torch.randn(1, HEADS, rows, HEAD_DIM)
    k, v = torch.randn(1, KV_HEADS, rows, HEAD_DIM), torch.randn(1, KV_HEADS, rows, HEAD_DIM)
    start = time.process_time()
    for _ in range(5):
        attend(layer, q, k, v, HEAD_DIM**-0.5, step)
    return (time.process_time() - start) / 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cache = KVCache(  # layer 0 slides, layer 1 sees every earlier key
        num_layers=2,
        num_kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        capacity_tokens=DECODE_ROWS * CONTEXT,
        windows=[WINDOW, None],
    )
    for pool in (*cache.k, *cache.v):
        pool.normal_()
    steps = {
        "decode": (make_step(cache, [1] * DECODE_ROWS), DECODE_ROWS),
        "prompt_chunk": (make_step(cache, [CHUNK]), CHUNK),
    }
    results = {}
    for name, (step, rows) in steps.items():
        ratios, windowed, full = [], [], []
        for _ in range(args.rounds):
            windowed.append(seconds(0, step, rows))
            full.append(seconds(1, step, rows))
            ratios.append(windowed[-1] / full[-1])
        results[name] = {
            "windowed_ms": round(1e3 * statistics.median(windowed), 3),
            "full_ms": round(1e3 * statistics.median(full), 3),
            "windowed_over_full": round(statistics.median(ratios), 3),
        }
        print(name, results[name])
    report = {
        "cpu": cpu_model_name(),
        "date": datetime.date.today().isoformat(),
        "threads": 1,
        "shape": dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, context=CONTEXT, window=WINDOW),
        "decode_rows": DECODE_ROWS,
        "prompt_chunk_rows": CHUNK,
        "rounds": args.rounds,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
