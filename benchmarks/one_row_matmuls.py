"""One decode row through every matmul of the default model: how fast each kernel reads the weights.

A one-stream decode token multiplies one row by each of the model's 121 weights (per layer the fused
q/k/v, o, the fused gate/up and down; then the head), 538 MB in fp32: memory bound, so the figure
that matters is GB/s of weights read. For each dtype, in turn round after round (medians):
  packed     oneDNN's matmul on weights packed once (the eager pass's CPU default)
  plain      F.linear (MKL on CPU)
  reduction  one torch.compile'd graph computing every matmul as (x * W).sum(-1), the compiled
             decode step's form where our row kernels are not built (server/engine/compiled_step.py)
  rows       ours, adapters/row_kernels.cpp's `dense_rows` (built here): what the compiled step calls
  sum        W.sum() over the same bytes: the read bandwidth a plain streaming pass reaches
int8 (weight-only, per-channel scales) has aten's kernel (`_weight_int8pack_mm` on bf16
activations), ours (adapters/row_kernels.cpp: "int8 rows") and the reduction over int8
weights. llama.cpp's figure for the same bytes comes from
one_stream.py (its whole token, so a lower bound on its matmuls' bandwidth).

Usage: python benchmarks/one_row_matmuls.py [--rounds 11] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# What torch's allocator makes (the int8 and bf16 copies below) on huge pages, as `serve` sets it
# (server/engine/host_memory.py): read once, when torch is imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters import native  # noqa: E402
from adapters.backends.cpu import PACKABLE_DTYPES, cpu_model_name, pack, packed_linear  # noqa: E402
from adapters.kernels import KERNEL_DTYPE, Int8Weight  # noqa: E402
from server.engine.model_loader import default_cache_dir, load_base_model  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "one_row_matmuls.json"


def model_weights() -> list[torch.Tensor]:
    """The default model's weights as a decode token meets them (fused groups concatenated), fp32."""
    model = load_base_model(None).model
    weights = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        weights += [torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), attn.o_proj.weight]
        weights += [torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight]
    return [w.detach() for w in (*weights, model.lm_head.weight)]


@torch.compile(dynamic=False, fullgraph=True)
def reductions(xs: list[torch.Tensor], weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(x * w).sum(-1) for x, w in zip(xs, weights)]


@torch.compile(dynamic=False, fullgraph=True)
def int8_reductions(xs: list[torch.Tensor], qs: list[torch.Tensor], scales: list[torch.Tensor]) -> list[torch.Tensor]:
    return [(x * q).sum(-1) * s for x, q, s in zip(xs, qs, scales)]


def kernels(fp32: list[torch.Tensor]) -> dict[str, tuple[int, dict]]:
    """{dtype: (bytes read, {kernel: callable})}."""
    out = {}
    built = native.load_row_kernels(default_cache_dir())
    for dtype in (torch.float32, torch.bfloat16):
        weights = [w.to(dtype) for w in fp32]
        xs = [torch.randn(1, w.shape[1], dtype=dtype) for w in weights]
        runs = {
            "plain": lambda w=weights, x=xs: [F.linear(a, b) for a, b in zip(x, w)],
            "reduction": lambda w=weights, x=xs: reductions(x, w),
            "sum": lambda w=weights: [b.sum() for b in w],
        }
        if built:
            rows = native.dense_rows_op()
            runs["rows"] = lambda w=weights, x=xs: [rows(a, b, None) for a, b in zip(x, w)]
        if dtype in PACKABLE_DTYPES:
            packed = [pack(w) for w in weights]
            runs["packed"] = lambda w=packed, x=xs: [packed_linear(a, b, None) for a, b in zip(x, w)]
        out[str(dtype).removeprefix("torch.")] = (sum(w.nbytes for w in weights), runs)
    int8 = [Int8Weight.quantize(w) for w in fp32]
    xs = [torch.randn(1, w.shape[1]) for w in fp32]
    x_bf16 = [x.to(KERNEL_DTYPE) for x in xs]
    scales = [w.scales.float() for w in int8]
    int8_rows = native.int8_rows_op() if built else None
    ours = {"int8 rows": lambda: [int8_rows(x, w.q, s) for x, w, s in zip(x_bf16, int8, scales)]} if int8_rows else {}
    out["int8"] = (
        sum(w.nbytes for w in int8),
        {
            "int8 kernel": lambda: [torch.ops.aten._weight_int8pack_mm(x, w.q, w.scales) for x, w in zip(x_bf16, int8)],
            **ours,
            "reduction": lambda: int8_reductions(xs, [w.q for w in int8], scales),
            "sum": lambda: [w.q.view(torch.float32).sum() for w in int8],  # the same bytes as floats
        },
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "loraserve-bench-inductor"))
    results = {}
    with torch.inference_mode():
        for dtype, (nbytes, runs) in kernels(model_weights()).items():
            for run in runs.values():
                run()  # compile, pack, warm
            ms = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run()
                    ms[name].append((time.perf_counter() - started) * 1e3)
            medians = {name: statistics.median(times) for name, times in ms.items()}
            results[dtype] = {
                "weights_mb": round(nbytes / 1e6, 1),
                "ms": {name: round(m, 2) for name, m in medians.items()},
                "gb_per_s": {name: round(nbytes / m / 1e6, 1) for name, m in medians.items()},
            }
            print(dtype, json.dumps(results[dtype]), flush=True)
    write_report(args.out, args.rounds, results)


def write_report(path: Path, rounds: int, results: dict, **facts) -> None:
    """The JSON of a one-row run: the machine, `facts`, the rounds and the results."""
    report = {
        "cpu": cpu_model_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **facts,
        "load_average": os.getloadavg(),
        "rounds": rounds,
        "results": results,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
