"""Prefix caching on the default model: time to first token and prefill saved, and the design choice.

Three parts, one engine per configuration, 1 torch thread by default (the machine is shared):
- shared_prefix: a ~1,100-token system prompt, then questions. Per round a new system prompt
  (so the first request is cold), then `--warm` requests with other questions behind it; TTFT
  of each, medians over rounds. Target: warm TTFT at least 4x lower than cold.
- design: what a hit costs with copy-on-hit (copying the prefix's blocks into a new extent),
  against recomputing it (the cold prefill above), and what block tables would cost instead
  on every decode step: attention reading that context gathered from blocks vs as a view.
- multi_turn: conversations (system prompt + growing history) on the base and two adapters,
  every conversation's next turn submitted together; throughput and TTFT with caching on and off.

Usage: python benchmarks/prefix_cache.py [--rounds N] [--threads N] [--out PATH]
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
import torch.nn.functional as F

from adapters.backends.cpu import cpu_model_name
from server.engine.config import EngineConfig
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import load_base_model
from server.engine.sampling_params import SamplingParams

TARGET = 4.0
RULES = (
    "Rule {i}: when a user asks about topic {i}, answer in plain words, cite rule {i}, keep it short, "
    "and never invent facts you cannot check. "
)
QUESTIONS = [
    "What is two plus two?",
    "Name a colour.",
    "Who wrote Hamlet?",
    "Spell cat.",
    "Is water wet?",
    "What day follows Monday?",
]
MODELS = [None, "alpha", "beta"]
DEFAULT_OUT = Path(__file__).parent / "results" / "prefix_cache.json"


def system_prompt(tokenizer, variant: int, num_tokens: int) -> str:
    text, i = f"Deployment {variant}. You are a support assistant.\n", 0
    while len(tokenizer.encode(text)) < num_tokens:
        text += RULES.format(i=i)
        i += 1
    return text


def make_adapters(model, root: Path) -> dict[str, Path]:
    import peft

    paths = {}
    for seed, name in enumerate(MODELS[1:]):
        torch.manual_seed(seed)
        config = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
        )
        peft.get_peft_model(copy.deepcopy(model), config).save_pretrained(root / name)
        paths[name] = root / name
    return paths


def make_engine(paths: dict[str, Path], caching: bool) -> LLMEngine:
    engine = LLMEngine(load_base_model(), EngineConfig(enable_prefix_caching=caching, kv_cache_tokens=32768))
    for name, path in paths.items():
        engine.registry.add(name, path)
    return engine


def generate(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, adapters: list) -> tuple[list, list]:
    """Run the prompts together: their completions and each one's time to first token, in order."""
    seen: dict[str, float] = {}

    def listener(stats) -> None:
        seen[stats.request_id] = stats.time_to_first_token

    engine.request_listeners.append(listener)
    try:
        completions = engine.generate(prompts, params, adapters)
    finally:
        engine.request_listeners.remove(listener)
    return completions, [seen[c.request_id] for c in completions]


def ttfts(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, adapters: list) -> list[float]:
    return generate(engine, prompts, params, adapters)[1]


def shared_prefix(engine: LLMEngine, rounds: int, warm: int, prefix_tokens: int) -> dict:
    tok, params = engine.tokenizer, SamplingParams(temperature=0, max_tokens=1)
    cold, warm_ttft = [], []
    for r in range(rounds):
        system = system_prompt(tok, r, prefix_tokens)
        prompts = [tok.encode(system + "\nQuestion: " + q) for q in QUESTIONS[: warm + 1]]
        cold += ttfts(engine, prompts[:1], params, [None])
        for prompt in prompts[1:]:
            warm_ttft += ttfts(engine, [prompt], params, [None])
        print(f"round {r}: cold {cold[-1]:.3f}s, warm {statistics.median(warm_ttft[-warm:]):.3f}s", flush=True)
    cold_s, warm_s = statistics.median(cold), statistics.median(warm_ttft)
    return {
        "prompt_tokens": len(prompts[0]),
        "cold_ttft_s": cold,
        "warm_ttft_s": warm_ttft,
        "median_cold_ttft_s": cold_s,
        "median_warm_ttft_s": warm_s,
        "speedup": cold_s / warm_s,
        "prefill_tokens_saved_per_warm_request": engine.stats().prefix_cache_hits // max(1, rounds * warm),
    }


def design(engine: LLMEngine, num_tokens: int, repeats: int = 20) -> dict:
    """Copy-on-hit cost, and the per-step gather block tables would add, for a `num_tokens` context."""
    cache, size = engine.cache, engine.cache.block_size
    num_blocks = num_tokens // size
    assert cache.reserve(-1, num_blocks * size, 0) and cache.reserve(-2, num_blocks * size, 0)
    sources = [cache.start(-1) + i * size for i in range(num_blocks)]
    scattered = sources[::2] + sources[1::2]  # worst case: no two blocks adjacent in the pool

    def timed(fn) -> float:
        fn()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    copy_s = timed(lambda: cache.copy_blocks(sources, cache.start(-2)))
    scattered_s = timed(lambda: cache.copy_blocks(scattered, cache.start(-2)))
    heads = engine.lora_model.model.config.num_attention_heads
    k0 = cache.k[0]
    query = torch.randn(1, heads, 1, k0.shape[-1], dtype=k0.dtype)
    ctx = slice(cache.start(-1), cache.start(-1) + num_blocks * size)
    index = torch.tensor([s + t for s in scattered for t in range(size)])

    def attend(gather: bool) -> None:
        for k, v in zip(cache.k, cache.v):
            keys, values = (k.index_select(1, index), v.index_select(1, index)) if gather else (k[:, ctx], v[:, ctx])
            F.scaled_dot_product_attention(query, keys[None], values[None], enable_gqa=True)

    view_s, gather_s = timed(lambda: attend(False)), timed(lambda: attend(True))
    cache.free(-1)
    cache.free(-2)
    per_token = cache.k[0].shape[0] * cache.k[0].shape[2] * cache.k[0].element_size() * 2 * len(cache.k)
    return {
        "context_tokens": num_blocks * size,
        "kv_bytes": per_token * num_blocks * size,
        "copy_on_hit_s": copy_s,
        "copy_on_hit_scattered_blocks_s": scattered_s,
        "decode_attention_view_s": view_s,
        "decode_attention_gathered_blocks_s": gather_s,
        "gather_extra_per_decode_step_s": gather_s - view_s,
    }


def multi_turn(engine: LLMEngine, turns: int, per_model: int, max_tokens: int, system: str) -> dict:
    tok = engine.tokenizer
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    chats = [(MODELS[i % len(MODELS)], [{"role": "system", "content": system}]) for i in range(per_model * len(MODELS))]
    before, started, all_ttft, tokens, outputs = engine.stats(), time.perf_counter(), [], 0, []
    for turn in range(turns):
        prompts = []
        for i, (_, messages) in enumerate(chats):
            messages.append({"role": "user", "content": QUESTIONS[(i + turn) % len(QUESTIONS)]})
            prompts.append(engine.tokenization.chat_prompt(messages))
        completions, turn_ttft = generate(engine, prompts, params, [model for model, _ in chats])
        for (_, messages), completion in zip(chats, completions):
            messages.append(
                {"role": "assistant", "content": tok.decode(completion.token_ids, skip_special_tokens=True)}
            )
            tokens += len(completion.token_ids)
            outputs.append(completion.token_ids)
        all_ttft += turn_ttft
    seconds, after = time.perf_counter() - started, engine.stats()
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    return {
        "seconds": seconds,
        "output_tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "prompt_tokens": after.num_prompt_tokens - before.num_prompt_tokens,
        "median_ttft_s": statistics.median(all_ttft),
        "mean_ttft_s": statistics.fmean(all_ttft),
        "prefix_cache_hit_rate": (after.prefix_cache_hits - before.prefix_cache_hits) / queries if queries else 0.0,
        "token_ids": outputs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=3, help="warm requests per round")
    parser.add_argument("--prefix-tokens", type=int, default=1100)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--chats-per-model", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(load_base_model().model, Path(tmp))
        engines = {"on": make_engine(paths, True), "off": make_engine(paths, False)}
    on = engines["on"]
    report = {"shared_prefix": shared_prefix(on, args.rounds, args.warm, args.prefix_tokens)}
    print(json.dumps(report["shared_prefix"]), flush=True)
    report["design"] = design(on, args.prefix_tokens)
    print(json.dumps(report["design"]), flush=True)
    chat_system = system_prompt(on.tokenizer, 99, 500)
    report["multi_turn"] = {}
    for name in ("off", "on"):  # the same conversations: greedy, so both runs see the same histories
        report["multi_turn"][name] = multi_turn(engines[name], args.turns, args.chats_per_model, 24, chat_system)
        print(name, json.dumps({k: v for k, v in report["multi_turn"][name].items() if k != "token_ids"}), flush=True)
    mt = report["multi_turn"]
    mt["outputs_equal"] = mt["on"].pop("token_ids") == mt["off"].pop("token_ids")  # greedy: caching changes nothing
    report["multi_turn"]["throughput_on/off"] = mt["on"]["tokens_per_s"] / mt["off"]["tokens_per_s"]
    report["multi_turn"]["median_ttft_off/on"] = mt["off"]["median_ttft_s"] / mt["on"]["median_ttft_s"]
    report["machine"] = {
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "load_average_1m": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    report["workload"] = {
        "rounds": args.rounds,
        "warm_per_round": args.warm,
        "prefix_tokens": args.prefix_tokens,
        "turns": args.turns,
        "chats": args.chats_per_model * len(MODELS),
        "models": ["base", *MODELS[1:]],
        "adapter": "r=8 q,k,v,o",
        "multi_turn_max_tokens": 24,
        "block_size": on.config.block_size,
        "target_speedup": TARGET,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
