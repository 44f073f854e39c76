"""The LoRA share of a mixed decode batch in the engine (issue 14's "mixed-step LoRA cost").

16 requests at once on the default model, each on one of 4 adapters (r 8/16/4/8 over different
targets, the peer benchmark's set), 48 greedy tokens each, against the same 16 requests on the
base; rounds alternate the two. Reported: mixed/base throughput, and the LoRA share of the mixed
run (wall time inside `add_lora`, the gather op, over the run's wall time). Run it on an older
checkout to compare (`PYTHONPATH=<checkout> python benchmarks/mixed_step.py`): it uses only the
engine's public API.

Usage: python benchmarks/mixed_step.py [--rounds 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from vs_llamacpp import ADAPTERS, make_adapters

import adapters.layer
from adapters.backends.cpu import cpu_model_name
from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_loader import load_base_model
from server.engine.sampling_params import SamplingParams

ROWS, TOKENS = 16, 48
DEFAULT_OUT = Path(__file__).parent / "results" / "mixed_step.json"


class LoraClock:
    """Wall time spent adding LoRA deltas: in `LoraLinear.add_delta` (every path a linear takes:
    runs, stacked, groups), or on checkouts without it in `add_lora`, wherever it is called from."""

    def __init__(self):
        self.seconds = 0.0
        layer = adapters.layer.LoraLinear
        if hasattr(layer, "add_delta"):
            layer.add_delta = self._timed(layer.add_delta)
            return
        for module in self._callers():
            original = module.add_lora
            module.add_lora = self._timed(original)

    @staticmethod
    def _callers() -> list:
        found = [adapters.layer]
        for name in ("adapters.fused", "adapters.experts"):  # where other checkouts call it from too
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            if hasattr(module, "add_lora"):  # fused.py stopped importing it (it calls the layers')
                found.append(module)
        return found

    def _timed(self, original):
        def add_lora(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return add_lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    base = load_base_model()
    prompt = base.tokenizer.encode("LoRA adapts a frozen model with a low-rank update, so one server keeps one base.")
    clock = LoraClock()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base.model, Path(tmp))
        engine = LLMEngine(base, EngineConfig(enable_prefix_caching=False))
        for name, path in paths.items():
            engine.registry.add(name, path)
    names = list(ADAPTERS)
    params = [SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)] * ROWS

    def run(mixed: bool) -> tuple[float, float]:
        clock.seconds = 0.0
        started = time.perf_counter()
        engine.generate([prompt] * ROWS, params, [names[i % len(names)] if mixed else None for i in range(ROWS)])
        seconds = time.perf_counter() - started
        return seconds, clock.seconds / seconds

    run(True), run(False)  # warm-up: slots loaded, kernels chosen
    mixed, base_runs, shares = [], [], []
    for _ in range(args.rounds):
        seconds, share = run(True)
        mixed.append(seconds), shares.append(share)
        base_runs.append(run(False)[0])
    ratio = statistics.median(b / m for m, b in zip(mixed, base_runs))
    commit = subprocess.run(
        ["git", "-C", str(Path(adapters.layer.__file__).parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    result = {
        "machine": {
            "cpu": cpu_model_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "code": {"checkout": str(Path(adapters.layer.__file__).parents[1]), "commit": commit},
        "workload": {
            "rows": ROWS,
            "tokens": TOKENS,
            "adapters": {k: {"rank": r, "targets": t} for k, (r, t) in ADAPTERS.items()},
        },
        "seconds": {"mixed": mixed, "base": base_runs},
        "lora_share_per_round": shares,
        "mixed_over_base_throughput": ratio,
        "lora_share": statistics.median(shares),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{commit}: mixed/base throughput {ratio:.3f}, LoRA share of the mixed run {result['lora_share']:.3f}")


if __name__ == "__main__":
    main()
