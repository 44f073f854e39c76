"""What LoRA on MoE experts costs on CPU (docs/models.md): adapters on every linear layer plus the
experts and router (PEFT's target_parameters, adapters/experts.py) against the same ranks on the
linear layers alone, on the same base.

Two engines per model: one with two all-linear-plus-experts adapters, one with two all-linear
adapters (attention and dense linears only). Three workloads: one base request (both engines run the
stock experts implementation), one adapter request (merged after four steps: ours runs the merged
expert stacks through its own per-expert loop), and a mixed batch of 8 requests over base, a and b
(ours sorts the (token, expert) pairs by adapter and adds each pair's delta). Process CPU time, one
torch thread, the two engines alternated in every round; the figure is the median ratio of the
experts engine's tokens/s over the linear-only engine's. Models: the tests' tiny Mixtral and
Qwen3-MoE (hidden 64, 4 experts), and a small Mixtral (hidden 512, 8 experts, top-2) where the
matmuls weigh more than the Python around them.

Usage: python benchmarks/moe_experts.py [--rounds 5] [--out PATH]
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
from support.families import VOCAB, build  # noqa: E402
from support.peft import make_peft_adapter  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "moe_experts.json"
MODELS = {  # name -> (family, config overrides)
    "mixtral tiny": ("mixtral", {}),
    "qwen3_moe tiny": ("qwen3_moe", {}),
    "mixtral small": ("mixtral", dict(hidden_size=512, intermediate_size=1024, num_local_experts=8)),
}
EXPERTS = ["gate_up_proj", "down_proj", "gate.weight"]
TOKENS, MIXED_ROWS, MIXED_TOKENS = 32, 8, 16


def make_engine(family: str, overrides: dict, root: Path, experts: bool) -> LLMEngine:
    base = build(family, **overrides)
    engine = LLMEngine(BaseModel(build(family, **overrides), load_tokenizer(), family, root), EngineConfig())
    extra = dict(target_parameters=EXPERTS) if experts else {}
    for name, kwargs in {"a": dict(r=8, lora_alpha=16), "b": dict(r=4, lora_alpha=8, use_rslora=True)}.items():
        path = root / f"{family}-{len(overrides)}-{experts}" / name
        engine.registry.add(name, make_peft_adapter(base, path, target_modules="all-linear", **kwargs, **extra))
    return engine


def tokens_per_s(engine: LLMEngine, rows: int, num_tokens: int, adapters: list[str | None]) -> float:
    generator = torch.Generator().manual_seed(rows)
    prompts = [torch.randint(3, VOCAB, (16,), generator=generator).tolist() for _ in range(rows)]
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, ignore_eos=True)
    started = time.process_time()
    engine.generate(prompts, params, [adapters[i % len(adapters)] for i in range(rows)])
    return rows * num_tokens / (time.process_time() - started)


WORKLOADS = {
    "base": lambda engine: tokens_per_s(engine, 1, TOKENS, [None]),
    "one_adapter_merged": lambda engine: tokens_per_s(engine, 1, TOKENS, ["a"]),
    "mixed": lambda engine: tokens_per_s(engine, MIXED_ROWS, MIXED_TOKENS, [None, "a", "b"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ratios = {model: {kind: [] for kind in WORKLOADS} for model in MODELS}
    with tempfile.TemporaryDirectory() as tmp:
        for model, (family, overrides) in MODELS.items():
            engines = [make_engine(family, overrides, Path(tmp), experts) for experts in (True, False)]
            for engine in engines:  # warm-up: first-call costs out of the timings
                tokens_per_s(engine, 2, 4, [None, "a"])
            for _ in range(args.rounds):
                for kind, measure in WORKLOADS.items():
                    experts, linear = measure(engines[0]), measure(engines[1])
                    ratios[model][kind].append(experts / linear)
    result = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model_name(),
        "torch_threads": 1,
        "clock": "process CPU time",
        "rounds": args.rounds,
        "workload": {
            "base": f"1 base request, {TOKENS} greedy tokens",
            "one_adapter_merged": f"1 request on adapter a, {TOKENS} greedy tokens (merged after 4 steps)",
            "mixed": f"{MIXED_ROWS} requests over base, a and b, {MIXED_TOKENS} greedy tokens each",
        },
        "experts_over_linear_only": {
            model: {kind: round(statistics.median(values), 2) for kind, values in r.items()}
            for model, r in ratios.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for model, r in result["experts_over_linear_only"].items():
        print(f"{model:16s} " + "  ".join(f"{kind} {value:.2f}" for kind, value in r.items()))


if __name__ == "__main__":
    main()
