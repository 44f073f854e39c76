"""Where one decode token's time goes on CPU, eager and compiled (server/engine/compiled_step.py).

One stream on the default model (fp32 and the engine's packed kernels unless `--dtype` and
`--quantization` say otherwise): 32 tokens warm up, then torch's
profiler records `--tokens` decode steps of each path, and the top ops by self CPU time over them are
printed. Steps are also timed interleaved (eager, compiled, eager, ...) so a busy spell on a shared
machine hits both; the JSON keeps the tables and the medians.

Usage: python benchmarks/profile_one_token.py [--tokens 16] [--dtype bfloat16] [--quantization int8] [--out PATH]
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

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.backends.cpu import cpu_model_name  # noqa: E402
from server.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from server.engine.model_loader import load_base_model  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "profile_one_token.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantization", default="none", choices=("none", "int8", "q4_1"))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    base = load_base_model(None, dtype=args.dtype)
    with tempfile.TemporaryDirectory() as cache_dir:
        started = time.perf_counter()
        config = EngineConfig(compile_decode="on", cache_dir=Path(cache_dir), quantization=args.quantization)
        engine = LLMEngine(base, config)
        startup = time.perf_counter() - started
        print(f"engine ready in {startup:.1f} s (compile included)", flush=True)
        compiled = engine.runner.compiled
        prompt = base.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 4)
        request = engine.add_request(prompt, SamplingParams(max_tokens=4000, temperature=0, ignore_eos=True))
        for _ in range(32):
            engine.step()
        step_ms: dict[str, list[float]] = {"eager": [], "compiled": []}
        tables = {}
        for _ in range(3):
            for name in ("eager", "compiled"):
                engine.runner.compiled = compiled if name == "compiled" else None
                for _ in range(args.tokens):
                    begin = time.perf_counter()
                    engine.step()
                    step_ms[name].append((time.perf_counter() - begin) * 1e3)
        for name in ("eager", "compiled"):
            engine.runner.compiled = compiled if name == "compiled" else None
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.tokens):
                    engine.step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
            tables[name] = table
            print(f"--- {name}: {args.tokens} tokens ---\n{table}", flush=True)
        engine.abort(request.request_id)
    result = {
        "cpu": cpu_model_name(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "quantization": args.quantization,
        "load_average": os.getloadavg(),
        "startup_with_compile_s": round(startup, 1),
        "median_step_ms": {name: round(statistics.median(ms), 2) for name, ms in step_ms.items()},
        "tokens_profiled": args.tokens,
        "tables": tables,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "tables"}, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
