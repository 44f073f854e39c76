"""xgrammar against llguidance on the default model's tokenizer: what chose server/engine/grammar.py.

For one JSON schema (enum, bounds, lengths, required, additionalProperties: false), compact JSON:
the tokenizer table (once per server), the compile (once per schema), and the mask per generated
token over a valid 23-token answer (medians of several passes). Only llguidance is a dependency;
install xgrammar by hand to run this (`.venv/bin/pip install -c constraints.txt xgrammar`).

Usage: python benchmarks/grammar_backends.py [--repeats N] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from adapters.backends.cpu import cpu_model_name
from server.engine.model_loader import resolve_model_dir

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "age", "color"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}},
    },
}
ANSWER = json.dumps({"name": "Alice Smith", "age": 42, "color": "green", "tags": ["a", "bc"]}, separators=(",", ":"))
DEFAULT_OUT = Path(__file__).parent / "results" / "grammar_backends.json"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def per_token_ms(new_matcher, fill, accept, ids: list[int], repeats: int) -> float:
    """Median over passes of (mask time) / (masks filled) while walking the answer's tokens."""
    passes = []
    for _ in range(repeats):
        matcher, spent = new_matcher(), 0.0
        for token in ids:
            spent += seconds(lambda: fill(matcher))
            assert accept(matcher, token), "the backend refused a valid answer"
        passes.append(spent / len(ids) * 1e3)
    return statistics.median(passes)


def measure_llguidance(tokenizer, vocab: int, ids: list[int], repeats: int) -> dict:
    import llguidance
    import llguidance.hf

    out: dict = {}
    start = time.perf_counter()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    out["tokenizer_s"] = time.perf_counter() - start
    defaults = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    compiled = []
    out["compile_s"] = seconds(
        lambda: compiled.append(
            llguidance.LLMatcher(
                ll_tokenizer, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults=defaults)
            )
        )
    )
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    out["mask_ms_per_token"] = per_token_ms(
        lambda: compiled[0].deep_copy(),
        lambda m: m.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4),
        lambda m, t: m.consume_token(t),
        ids,
        repeats,
    )
    return out


def measure_xgrammar(tokenizer, vocab: int, ids: list[int], repeats: int) -> dict:
    import xgrammar

    out: dict = {}
    start = time.perf_counter()
    compiler = xgrammar.GrammarCompiler(
        xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab), max_threads=1
    )
    out["tokenizer_s"] = time.perf_counter() - start
    compiled = []
    out["compile_s"] = seconds(
        lambda: compiled.append(
            compiler.compile_json_schema(
                json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"), strict_mode=True
            )
        )
    )
    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
    out["mask_ms_per_token"] = per_token_ms(
        lambda: xgrammar.GrammarMatcher(compiled[0]),
        lambda m: m.fill_next_token_bitmask(bitmask, 0),
        lambda m, t: m.accept_token(t),
        ids,
        repeats,
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None)[0])
    vocab, ids = 49152, tokenizer.encode(ANSWER)
    results = {}
    for name, measure in [("llguidance", measure_llguidance), ("xgrammar", measure_xgrammar)]:
        try:
            results[name] = measure(tokenizer, vocab, ids, args.repeats)
        except ImportError as exc:
            results[name] = {"skipped": str(exc)}
    report = {
        "machine": {
            "cpu": cpu_model_name(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1m": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "schema": SCHEMA,
        "answer_tokens": len(ids),
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
