"""One stream on an adapter that is not merged (its first steps, or a request too short to repay a
merge): decode steps through the compiled step's LoRA graph against the eager gather, beside the
base's compiled steps, in one process on the default model (in-process engines, no HTTP).

Each of the vs_llamacpp.py adapters (ranks 4-16 on various targets) and one of rank 24 on all seven
projections (first_request.py's, ~29 MB) runs one 48-token greedy request alone, on an engine that
never merges, compiled (--compile-decode on) and eager (off) in turn, round after round; reported:
the median ms of a decode step (the prompt's step excluded) per engine and adapter, and the ratio
eager/compiled of each round's pair. Tokens of the two engines are compared as well.

Usage: python benchmarks/adapter_stream.py [--rounds 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from vs_llamacpp import ADAPTERS, make_adapters

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # last: tests/adapters shadows ours

from adapters.backends.cpu import cpu_model_name
from server.engine.adapter_ref import AdapterRef
from server.engine.llm_engine import EngineConfig, LLMEngine
from server.engine.model_loader import load_base_model
from server.engine.sampling_params import SamplingParams
from support.peft import make_peft_adapter  # noqa: E402

TOKENS = 48
ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_OUT = Path(__file__).parent / "results" / "adapter_stream.json"
PROMPT = "LoRA adapts a frozen model with a low-rank update, so one server keeps one base."


def step_ms(engine: LLMEngine, prompt: list[int], adapter: str | None) -> tuple[float, list[int]]:
    """Median ms of the decode steps of one request alone, and its tokens."""
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)
    seq = engine.add_request(prompt, params, AdapterRef.of(adapter))
    times = []
    while not seq.is_finished:
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) * 1e3, list(seq.output_token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    load_average = os.getloadavg()[0]
    engines = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("compiled", "eager"):
            base = load_base_model()
            if mode == "compiled":  # made from the model as loaded, before an engine wraps its layers
                paths = make_adapters(base.model, Path(tmp) / "adapters")
                paths["all24"] = make_peft_adapter(
                    base.model, Path(tmp) / "all24", r=24, lora_alpha=48, target_modules=ALL_SEVEN
                )
            config = EngineConfig(
                enable_prefix_caching=False,
                merge_after_steps=10**6,  # never merges: every step of an adapter gathers
                compile_decode="on" if mode == "compiled" else "off",
                cache_dir=Path(tmp) / "cache" if mode == "compiled" else None,
            )
            engines[mode] = LLMEngine(base, config)
            for name, path in paths.items():
                engines[mode].registry.add(name, path)
        prompt = base.tokenizer.encode(PROMPT)
    names = [None, *paths]
    ms = {(mode, name): [] for mode in engines for name in names}
    same_tokens = {}
    for mode in engines:  # warm-up: slots loaded, kernels chosen
        for name in names:
            step_ms(engines[mode], prompt, name)
    for _ in range(args.rounds):
        for name in names:
            tokens = {}
            for mode, engine in engines.items():
                milliseconds, tokens[mode] = step_ms(engine, prompt, name)
                ms[mode, name].append(milliseconds)
            same_tokens[str(name)] = tokens["compiled"] == tokens["eager"]
    lora_steps = engines["compiled"].runner.compiled.num_lora_steps
    result = {
        "machine": {
            "cpu": cpu_model_name(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "load_average_1m_before": load_average,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "workload": {"tokens": TOKENS, "rounds": args.rounds, "adapters": {**ADAPTERS, "all24": (24, ALL_SEVEN)}},
        "ms_a_decode_step": {
            str(name): {mode: round(statistics.median(ms[mode, name]), 2) for mode in engines} for name in names
        },
        "eager_over_compiled": {
            str(name): round(statistics.median(e / c for e, c in zip(ms["eager", name], ms["compiled", name])), 3)
            for name in names
        },
        "same_tokens": same_tokens,
        "lora_graph_steps": lora_steps,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ms_a_decode_step", "eager_over_compiled", "same_tokens")}, indent=1))


if __name__ == "__main__":
    main()
