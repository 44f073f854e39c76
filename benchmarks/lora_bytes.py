"""A paper model of the LoRA row kernels' memory traffic (issue 25, item 3): the bytes each kernel
moves per decode step, from its grid and tile sizes, against the A/B bytes the step's adapters need.

No GPU runs here: for each step shape the script rebuilds the kernels' block table (rows sorted by
slot, blocks of BLOCK_M rows of one slot), the shrink's split plan (adapters/lora_kernels.py's
ShrinkPlan for 132 SMs) and rank chunks, and sums what each program loads and stores:
  - weights: each block loads its slot's A (shrink) or B (expand) rows up to the slot's own rank,
    its K range or its column block. Blocks of one slot in one launch load the same tile; the model
    counts it once (it is ≤ 512 KiB, re-read from L2, not DRAM). The kernels before issue 25 loaded
    the buffer's rank (max_lora_rank) for every slot, zeros included.
  - programs: the grid is (rows' blocks × splits or column blocks), each program looping over the
    items the step's blocks make; "before": the grid of (row blocks × 64 slots × ...) it replaced.
  - activations: x once per block and rank chunk, the split partials (fp32, written and read once),
    h written by the shrink and read by every column block of the expand, y read and written once.
`weights / needed` is the figure item 3 bounds (≤ 1.5x); `total / ideal` sets all bytes against a
kernel that reads each needed A/B byte, x and h once and y once each way.

Shapes: an 8B-class decoder layer (Llama 3 8B: hidden 4096, 1024-wide k/v, 14336 intermediate), bf16,
per projection; steps: one stream, 64 rows on 4 adapters (equal and mixed ranks), 256 rows on 64.

Usage: python benchmarks/lora_bytes.py [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TRITON_INTERPRET", "1")  # only the plan's arithmetic is used, never a launch

from adapters.lora_kernels import BLOCK_M, TARGET_PROGRAMS, ShrinkPlan, expand_block_n, rank_tile  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "lora_bytes.json"
ELEMENT = 2  # bf16
PROJECTIONS = {  # name: (in, out), Llama 3 8B
    "q": (4096, 4096),
    "k": (4096, 1024),
    "v": (4096, 1024),
    "o": (4096, 4096),
    "gate": (4096, 14336),
    "up": (4096, 14336),
    "down": (14336, 4096),
}
MAX_RANK = 64  # the buffer's rank (--max-lora-rank)
STEPS = {  # name: [(rows, rank) per adapter in the step]
    "one stream, rank 16": [(1, 16)],
    "64 rows, 4 adapters of rank 16": [(16, 16)] * 4,
    "64 rows, 4 adapters of ranks 8/16/32/64": [(16, 8), (16, 16), (16, 32), (16, 64)],
    "256 rows, 64 adapters of rank 16": [(4, 16)] * 64,
}


def blocks(step: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(rows, rank) of each BLOCK_M block the kernels' grid holds for the step's adapter rows."""
    return [(min(BLOCK_M, n - first), rank) for n, rank in step for first in range(0, n, BLOCK_M)]


def shrink_bytes(step, in_features: int) -> dict[str, int]:
    num_rows = sum(n for n, _ in step)
    row_blocks = blocks(step)
    grid_blocks = math.ceil(num_rows / BLOCK_M)
    plan = ShrinkPlan.choose(in_features, grid_blocks, 1, TARGET_PROGRAMS)
    tile = rank_tile(MAX_RANK)
    weights = sum(rank * in_features * ELEMENT for _, rank in step)  # each slot's tile once (L2 repeats)
    x = sum(rows * in_features * ELEMENT * math.ceil(rank / tile) for rows, rank in row_blocks)
    partials = 2 * sum(plan.num_splits * rows * rank * 4 for rows, rank in row_blocks) if plan.num_splits > 1 else 0
    h = sum(rows * rank * ELEMENT for rows, rank in row_blocks)
    return {
        "programs": grid_blocks * plan.num_splits,
        "items": len(row_blocks) * plan.num_splits,  # (block, split) pairs the programs loop over
        "programs_before": math.ceil(num_rows / BLOCK_M) * 64,
        "splits": plan.num_splits,
        "weights": weights,
        "weights_before": len(step) * MAX_RANK * in_features * ELEMENT,
        "activations": x + partials + h,
    }


def expand_bytes(step, out_features: int) -> dict[str, int]:
    num_rows = sum(n for n, _ in step)
    row_blocks = blocks(step)
    block_n = expand_block_n(out_features, math.ceil(num_rows / BLOCK_M), TARGET_PROGRAMS)
    column_blocks = math.ceil(out_features / block_n)
    weights = sum(rank * out_features * ELEMENT for _, rank in step)
    h = sum(rows * rank * ELEMENT * column_blocks for rows, rank in row_blocks)
    y = 2 * num_rows * out_features * ELEMENT
    return {
        "programs": math.ceil(num_rows / BLOCK_M) * column_blocks,
        "items": len(row_blocks) * column_blocks,  # (block, column block) pairs the programs loop over
        "programs_before": math.ceil(num_rows / BLOCK_M) * 64 * math.ceil(out_features / 64),
        "weights": weights,
        "weights_before": len(step) * MAX_RANK * out_features * ELEMENT,
        "activations": h + y,
    }


def model_step(step) -> dict:
    """Per projection and summed over the layer's seven: each kernel's bytes against what is needed."""
    num_rows = sum(n for n, _ in step)
    per_projection, totals = {}, {"weights": 0, "weights_before": 0, "needed": 0, "total": 0, "ideal": 0}
    for name, (in_features, out_features) in PROJECTIONS.items():
        shrink, expand = shrink_bytes(step, in_features), expand_bytes(step, out_features)
        needed = sum(rank * (in_features + out_features) * ELEMENT for _, rank in step)
        h_once = sum(n * rank * ELEMENT for n, rank in step)
        ideal = needed + num_rows * (in_features + 2 * out_features) * ELEMENT + 2 * h_once
        weights = shrink["weights"] + expand["weights"]
        total = weights + shrink["activations"] + expand["activations"]
        per_projection[name] = {"shrink": shrink, "expand": expand, "needed": needed, "ideal": ideal}
        for key, value in (
            ("weights", weights),
            ("weights_before", shrink["weights_before"] + expand["weights_before"]),
            ("needed", needed),
            ("total", total),
            ("ideal", ideal),
        ):
            totals[key] += value
    ratios = {
        "weights / needed": round(totals["weights"] / totals["needed"], 3),
        "weights before / needed": round(totals["weights_before"] / totals["needed"], 3),
        "total / ideal": round(totals["total"] / totals["ideal"], 3),
        "total / needed": round(totals["total"] / totals["needed"], 3),
    }
    return {"rows": num_rows, "layer_bytes": totals, "ratios": ratios, "per_projection": per_projection}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = {
        "model": "Llama 3 8B decoder layer, bf16, LoRA on all seven projections",
        "max_lora_rank": MAX_RANK,
        "target_programs": TARGET_PROGRAMS,
        "steps": {name: model_step(step) for name, step in STEPS.items()},
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, step in result["steps"].items():
        print(f"{name:42s} {json.dumps(step['ratios'])}")


if __name__ == "__main__":
    main()
