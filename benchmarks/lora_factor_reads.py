"""Where a mixed decode step's LoRA time goes: reading each layer's small factors cold.

mixed_step.py's workload (16 rows on 4 adapters, r 8/16/4/8 over different targets) runs the
stacked LoRA op on each of a layer's 7 projections: x·A_stackᵀ, a mask, ·B_stack (adapters/ops.py).
Between two layers the base's weights stream through the caches, so each op meets its factors
(36-200 KB) cold. This walks the default model's fused weights (one_row_matmuls.py's set: q/k/v and
gate/up concatenated) as a 16-row step does, with random factors of that workload's stacked ranks,
and times per step:
  - base: the base matmuls alone;
  - separate: base, then each projection's shrink, mask and expand (what the engine runs), each op
    timed; and "hot": the same ops timed on a second pass over factors just read, so the calls'
    own cost and the cold reads' come apart;
  - folded: each group's A rows appended to its base weight, so the shrink rides the weight stream
    (one GEMM), then the mask and the expands. Not built in the engine: it measures the gain
    first (the weights' copy would hold every loaded slot's A rows and be rebuilt at each load).
Rounds alternate the variants. Results as JSON with the CPU.

Usage: python benchmarks/lora_factor_reads.py [--rounds 7] [--out PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from one_row_matmuls import model_weights, write_report

ROWS = 16
# Σ rank of the workload's slots stacked on each projection: q 8+16+8, k 16+8, v 8+16+8, o 16+8,
# gate/up/down 4+8 (vs_llamacpp.ADAPTERS). A layer's four weights: q/k/v, o, gate/up, down.
GROUP_RANKS = [(32, 24, 32), (24,), (12, 12), (12,)]
DEFAULT_OUT = Path(__file__).parent / "results" / "lora_factor_reads.json"


class Layer:
    """One fused weight and its members' stacked factors: Aᵀ [in, Σr] and B [Σr, out] each."""

    def __init__(self, weight: torch.Tensor, ranks: tuple[int, ...]):
        self.weight = weight
        outs = [weight.shape[0] // len(ranks)] * len(ranks)
        if len(ranks) == 3:  # q/k/v: the default model's q is 576 rows, k and v 192
            outs = [weight.shape[0] - 2 * 192, 192, 192]
        self.outs = outs
        self.a_t = [torch.randn(weight.shape[1], r) * 0.02 for r in ranks]
        self.b = [torch.randn(r, out) * 0.02 for r, out in zip(ranks, outs)]
        self.masks = [torch.rand(ROWS, r) for r in ranks]
        a_rows = torch.cat([a.T for a in self.a_t])
        self.folded = torch.cat([weight, a_rows])  # [out + Σ Σr, in]
        self.joint_mask = torch.cat(self.masks, dim=1)

    def base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def lora(self, x: torch.Tensor, y: torch.Tensor, clock: Counter) -> None:
        """The engine's stacked op, one projection at a time, each call's time added to `clock`."""
        for y_i, a_t, b, mask in zip(y.split(self.outs, dim=1), self.a_t, self.b, self.masks):
            t0 = time.perf_counter()
            h = torch.mm(x, a_t)
            t1 = time.perf_counter()
            h.mul_(mask)
            t2 = time.perf_counter()
            y_i.addmm_(h, b)
            t3 = time.perf_counter()
            clock["shrink"] += t1 - t0
            clock["mask"] += t2 - t1
            clock["expand"] += t3 - t2

    def folded_step(self, x: torch.Tensor) -> None:
        out = F.linear(x, self.folded)
        y, h = out.split([self.weight.shape[0], out.shape[1] - self.weight.shape[0]], dim=1)
        h = h * self.joint_mask
        start = 0
        for y_i, b in zip(y.split(self.outs, dim=1), self.b):
            y_i.addmm_(h[:, start : start + b.shape[0]], b)
            start += b.shape[0]


def walk(layers: list[Layer], x: dict[int, torch.Tensor], variant: str) -> tuple[float, Counter]:
    """(seconds for the step, seconds in each LoRA op) of one pass over every layer."""
    clock: Counter = Counter()
    started = time.perf_counter()
    for layer in layers:
        xi = x[layer.weight.shape[1]]
        if variant == "folded":
            layer.folded_step(xi)
            continue
        y = layer.base(xi)
        if variant == "hot":  # the factors read just before: the ops' cost without the cold reads
            layer.lora(xi, y, Counter())
        if variant in ("separate", "hot"):
            layer.lora(xi, y, clock)
    return time.perf_counter() - started, clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    weights = model_weights()[:-1]  # the head carries no LoRA in the workload
    layers = [Layer(w, GROUP_RANKS[i % 4]) for i, w in enumerate(weights)]
    x = {n: torch.randn(ROWS, n) for n in {w.shape[1] for w in weights}}
    variants = ("base", "separate", "hot", "folded")
    times: dict[str, list] = {v: [] for v in variants}
    for v in variants:  # warm-up
        walk(layers, x, v)
    for _ in range(args.rounds):
        for v in variants:
            times[v].append(walk(layers, x, v))
    med = {v: statistics.median(t for t, _ in times[v]) * 1e3 for v in variants}
    ops = {
        name: {op: statistics.median(clock[op] for _, clock in times[v]) * 1e3 for op in ("shrink", "mask", "expand")}
        for name, v in (("cold, as the engine meets them", "separate"), ("hot, factors just read", "hot"))
    }
    results = {
        "step_ms": {v: med[v] for v in ("base", "separate", "folded")},
        "lora_ops_ms": ops,
        "lora_share_of_step": {
            "separate": (med["separate"] - med["base"]) / med["separate"],
            "folded": (med["folded"] - med["base"]) / med["folded"],
        },
        "factor_bytes_per_step": sum(sum(t.nbytes for t in (*layer.a_t, *layer.b)) for layer in layers),
    }
    write_report(args.out, args.rounds, results, rows=ROWS, group_ranks=GROUP_RANKS)
    cold, hot = (sum(v.values()) for v in ops.values())
    print(
        f"step ms: base {med['base']:.1f}, separate {med['separate']:.1f}, folded {med['folded']:.1f}; "
        f"LoRA ops cold {cold:.1f} ms, hot {hot:.1f} ms"
    )


if __name__ == "__main__":
    main()
