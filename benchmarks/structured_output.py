"""Constrained against unconstrained decoding in one mixed-adapter workload on the default model.

One engine, the base and two adapters (rank 8, q/v), 12 requests sampled at temperature 0.9 with
seeds, each up to 64 tokens, run three ways in alternating rounds (medians after a warm-up round):
- free: no request constrained (ignore_eos, so every row runs its 64 tokens);
- mixed: every other request constrained to a JSON schema, rows of both kinds in each step;
- constrained: every request constrained.
Throughput is output tokens per second of the whole run; the target is constrained/free >= 0.8.
The schema asks for a long answer (8 strings and a 40-60 character summary) so that constrained
rows live about as long as free ones and the batches stay comparable.

Usage: python benchmarks/structured_output.py [--rounds N] [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from adapters.backends.cpu import cpu_model_name
from server.engine.config import EngineConfig
from server.engine.grammar import GrammarSpec
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import load_base_model
from server.engine.sampling_params import SamplingParams

NUM_REQUESTS, MAX_TOKENS, TARGET = 12, 64, 0.8
MODELS = [None, "alpha", "beta"]
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["items", "summary"],
    "properties": {
        "items": {"type": "array", "minItems": 8, "maxItems": 8, "items": {"type": "string", "maxLength": 12}},
        "summary": {"type": "string", "minLength": 40, "maxLength": 60},
    },
}
PROMPT = "List eight things to pack for a trip, as JSON, with a summary."
DEFAULT_OUT = Path(__file__).parent / "results" / "structured_output.json"


def make_adapters(model, root: Path) -> dict[str, Path]:
    import peft

    paths = {}
    for seed, name in enumerate(MODELS[1:]):
        torch.manual_seed(seed)
        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def workload(kind: str) -> list[SamplingParams]:
    spec = GrammarSpec(kind="json_schema", source=json.dumps(SCHEMA))
    constrained = {"free": lambda i: False, "mixed": lambda i: i % 2 == 1, "constrained": lambda i: True}[kind]
    return [
        SamplingParams(
            temperature=0.9, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True, grammar=spec if constrained(i) else None
        )
        for i in range(NUM_REQUESTS)
    ]


def run(engine: LLMEngine, kind: str) -> tuple[float, int]:
    """(seconds, output tokens) of one run of the workload."""
    adapters = [MODELS[i % len(MODELS)] for i in range(NUM_REQUESTS)]
    started = time.perf_counter()
    completions = engine.generate([PROMPT] * NUM_REQUESTS, workload(kind), adapters)
    return time.perf_counter() - started, sum(len(c.token_ids) for c in completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base_model()
        paths = make_adapters(load_base_model().model, Path(tmp))
        engine = LLMEngine(base, EngineConfig())
        for name, path in paths.items():
            engine.registry.add(name, path)
        kinds = ["free", "mixed", "constrained"]
        for kind in kinds:  # warm-up: compile the grammar, load the adapters
            run(engine, kind)
        tps: dict[str, list[float]] = {kind: [] for kind in kinds}
        for round_ in range(args.rounds):
            for kind in kinds if round_ % 2 == 0 else kinds[::-1]:
                seconds, tokens = run(engine, kind)
                tps[kind].append(tokens / seconds)
                print(f"round {round_} {kind}: {tokens / seconds:.1f} tokens/s", flush=True)
    medians = {kind: statistics.median(values) for kind, values in tps.items()}
    ratios = {
        "constrained/free": medians["constrained"] / medians["free"],
        "mixed/free": medians["mixed"] / medians["free"],
    }
    report = {
        "machine": {
            "cpu": cpu_model_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "load_average_1m": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "workload": {
            "requests": NUM_REQUESTS,
            "max_tokens": MAX_TOKENS,
            "models": ["base", *MODELS[1:]],
            "temperature": 0.9,
            "schema": SCHEMA,
        },
        "tokens_per_s": tps,
        "median_tokens_per_s": medians,
        "ratios": ratios,
        "target": TARGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"median_tokens_per_s": medians, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
