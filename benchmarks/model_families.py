"""CPU speed of each served family relative to Llama's, at the same tiny size (docs/models.md).

Each family's tiny random model (tests/support/families.py: hidden 64, 2 layers, vocabulary 512)
runs in the engine with its two test adapters: one stream (a base request, 64 greedy tokens) and
one mixed batch (8 requests over the base and both adapters, 32 tokens each). Llama runs twice,
through the lean pass and through the stock forward, to show what the lean pass saves. At this size
a step is almost all Python and kernel launches, so the ratios measure each family's forward glue,
not its arithmetic. Times are the process's CPU time (one torch thread), not wall time, and each
family is timed right after Llama in every round; the figure is the median of those paired ratios,
so another process sharing the machine moves neither much.

Usage: python benchmarks/model_families.py [--rounds 7] [--out PATH] [--families NAME ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from adapters.backends.cpu import cpu_model_name  # noqa: E402 - after the sys.path lines above
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.engine.model_loader import BaseModel  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from support.engine import load_tokenizer  # noqa: E402
from support.families import FAMILIES, VOCAB, adapter_kwargs, model, pristine  # noqa: E402
from support.peft import make_peft_adapter  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "model_families.json"
STOCK_LLAMA = "llama (stock forward)"
ONE_STREAM_TOKENS, MIXED_ROWS, MIXED_TOKENS = 64, 8, 32


def make_engine(family: str, root: Path) -> LLMEngine:
    name = "llama" if family == STOCK_LLAMA else family
    engine = LLMEngine(BaseModel(model(name), load_tokenizer(), name, root), EngineConfig())
    for adapter, kwargs in adapter_kwargs(name).items():
        engine.registry.add(adapter, make_peft_adapter(pristine(name), root / name / adapter, **kwargs))
    if family == STOCK_LLAMA:
        engine.runner.lean = None
    return engine


def tokens_per_s(engine: LLMEngine, rows: int, num_tokens: int, adapters: list[str | None]) -> float:
    generator = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(3, VOCAB, (16,), generator=generator).tolist() for _ in range(rows)]
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    started = time.process_time()
    engine.generate(prompts, params, [adapters[i % len(adapters)] for i in range(rows)])
    return rows * num_tokens / (time.process_time() - started)


WORKLOADS = {
    "one_stream": lambda engine: tokens_per_s(engine, 1, ONE_STREAM_TOKENS, [None]),
    "mixed": lambda engine: tokens_per_s(engine, MIXED_ROWS, MIXED_TOKENS, [None, "a", "b"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), help="only these, beside Llama")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the tests: tiny matmuls only pay for OpenMP hand-offs
    families = ["llama", STOCK_LLAMA, *(f for f in FAMILIES if f != "llama")]
    if args.families:
        families = ["llama", *(f for f in args.families if f != "llama")]
    with tempfile.TemporaryDirectory() as tmp:
        engines = {family: make_engine(family, Path(tmp)) for family in families}
        for engine in engines.values():  # warm-up: first-call costs out of the timings
            tokens_per_s(engine, 2, 4, [None, "a"])
        runs = {f: {"one_stream": [], "mixed": []} for f in families}  # tokens/s per round
        ratios = {f: {"one_stream": [], "mixed": []} for f in families}  # over Llama's run just before
        for _ in range(args.rounds):
            for family in families:
                for kind, measure in WORKLOADS.items():
                    llama, this = measure(engines["llama"]), measure(engines[family])
                    runs[family][kind].append(round(this))
                    ratios[family][kind].append(this / llama)
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model_name(),
        "torch_threads": 1,
        "clock": "process CPU time",
        "workload": {
            "one_stream": f"1 base request, {ONE_STREAM_TOKENS} greedy tokens",
            "mixed": f"{MIXED_ROWS} requests over base, a and b, {MIXED_TOKENS} greedy tokens each",
        },
        "tokens_per_s": runs,
        "relative_to_llama": {
            f: {kind: round(statistics.median(values), 2) for kind, values in r.items()} for f, r in ratios.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for family, ratios in result["relative_to_llama"].items():
        print(f"{family:24s} one stream {ratios['one_stream']:.2f}  mixed {ratios['mixed']:.2f}")


if __name__ == "__main__":
    main()
