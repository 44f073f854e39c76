"""One stream on CPU: loraserve's eager decode, its compiled decode and llama.cpp f32, in one run.

The one-stream phase of vs_llamacpp.py alone (one 128-token greedy request at a time, over real
HTTP, `--repeats` per server per round), for three servers on the same model and machine:
  loraserve-eager      `loraserve serve --enforce-eager` (the lean pass, eager)
  loraserve-compiled   `loraserve serve --compile-decode on` (server/engine/compiled_step.py)
  llama.cpp-f32        llama-server on an f32 GGUF of the same HF directory (vs_llamacpp.py builds it)
Rounds rotate the servers' order, so a busy spell on the shared machine hits one round rather than
one server; ratios are taken within each round and their median reported, beside the medians of
tokens/s. Each server's start-up (launch to ready) is recorded: the compiled server's first start
compiles (inductor's code is then cached under its --cache-dir), later ones reuse that code.
Records the CPU (lscpu's model name), the load average and the cores other processes kept busy.

`--variant NAME=FLAGS` (repeatable) replaces the two loraserve servers with loraserve-NAME servers
run with FLAGS, and `--reference q4_1` runs llama-server on the default model's own Q4_1 GGUF
instead of the f32 one (the comparison for lower-precision bases), e.g. for int8:
  python benchmarks/one_stream.py --reference q4_1 \
      --variant "int8-eager=--dtype bfloat16 --quantization int8 --enforce-eager" \
      --variant "int8-compiled=--dtype bfloat16 --quantization int8 --compile-decode on"

Usage: python benchmarks/one_stream.py [--rounds 3] [--repeats 3] [--variant NAME=FLAGS ...]
                                       [--reference f32|q4_1] [--out PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from vs_llamacpp import (
    ONE_STREAM_TOKENS,
    build_llama_server,
    convert,
    cpu_snapshot,
    llama_cpp_source,
    llamacpp_server,
    loraserve_server,
    make_workload,
    other_cores,
    request_fields,
    running,
    send_all,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from adapters.backends.cpu import cpu_model_name  # noqa: E402
from server.engine.model_loader import default_cache_dir, default_gguf_path, load_base_model  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "one_stream.json"
VARIANTS = {"eager": ["--enforce-eager"], "compiled": ["--compile-decode", "on"]}


def measure(server, prompt: list[int], repeats: int, log_path: Path) -> dict:
    """Seconds to ready, then one-stream tokens/s of `repeats` requests and the other processes' cores."""
    item = {"prompt": prompt, "max_tokens": ONE_STREAM_TOKENS, "adapter": None}
    started = time.perf_counter()
    with running(server, log_path) as (url, pid):
        ready = time.perf_counter() - started
        asyncio.run(send_all(url, server.body, [{**item, "max_tokens": 8}], 1))  # warm-up
        before, load = cpu_snapshot(pid), os.getloadavg()[0]
        runs = [asyncio.run(send_all(url, server.body, [item], 1))[0] for _ in range(repeats)]
        return {
            "startup_s": round(ready, 1),
            "one_stream": runs,
            "other_cores": other_cores(before, cpu_snapshot(pid)),
            "load_average": load,
        }


def summarize(raw: dict[str, list[dict]], reference: str) -> tuple[dict, dict]:
    """Median tokens/s per server, and each loraserve server's per-round ratio to `reference` (and
    compiled / eager, where both ran)."""
    median = {name: statistics.median(statistics.median(r["one_stream"]) for r in runs) for name, runs in raw.items()}
    per_round = lambda a, b: statistics.median(  # noqa: E731
        statistics.median(x["one_stream"]) / statistics.median(y["one_stream"]) for x, y in zip(raw[a], raw[b])
    )
    ours = [name for name in raw if name.startswith("loraserve-")]
    ratios = {f"{name.removeprefix('loraserve-')} / {reference}": per_round(name, reference) for name in ours}
    if {"loraserve-compiled", "loraserve-eager"} <= set(ours):
        ratios["compiled / eager"] = per_round("loraserve-compiled", "loraserve-eager")
    return median, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variant", action="append", metavar="NAME=FLAGS", help="a loraserve server's flags")
    parser.add_argument("--reference", choices=("f32", "q4_1"), default="f32", help="llama.cpp's weights")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    variants = dict(VARIANTS)
    if args.variant:
        variants = {name: shlex.split(flags) for name, _, flags in (v.partition("=") for v in args.variant)}
    cache = default_cache_dir() / "llama.cpp"
    source = llama_cpp_source(cache)
    binary = build_llama_server(source)
    base = load_base_model(None)
    prompt = make_workload(base.tokenizer, 1)[0]["prompt"][:64]
    if args.reference == "q4_1":
        gguf = default_gguf_path()
    else:
        gguf = convert(
            source / "convert_hf_to_gguf.py",
            [str(base.path), "--outtype", "f32"],
            cache / "gguf" / f"{base.path.name}-f32.gguf",
        )
    reference = f"llama.cpp-{args.reference}"
    servers = [loraserve_server(name, flags, base.path, {}) for name, flags in variants.items()]
    llama = llamacpp_server(reference, binary, gguf, [], no_repack=True)
    servers.append(
        dataclasses.replace(llama, body=lambda item: {"model": "base", **request_fields(item), "cache_prompt": False})
    )
    raw: dict[str, list[dict]] = {server.name: [] for server in servers}
    result = {
        "machine": {
            "cpu": cpu_model_name(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "one_stream_tokens": ONE_STREAM_TOKENS,
        "repeats": args.repeats,
        "servers": {name: flags for name, flags in variants.items()} | {reference: str(gguf)},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            shift = round_index % len(servers)
            for server in servers[shift:] + servers[:shift]:
                raw[server.name].append(measure(server, prompt, args.repeats, Path(tmp) / f"{server.name}.log"))
                run = raw[server.name][-1]
                print(
                    f"round {round_index + 1} {server.name:20s} {statistics.median(run['one_stream']):6.1f} tok/s  "
                    f"start {run['startup_s']:5.1f} s  other cores {run['other_cores']:.2f}",
                    flush=True,
                )
            median, ratios = summarize(raw, reference)
            result.update(rounds=round_index + 1, raw=raw, median_tokens_per_s=median, ratios=ratios)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # each round: a cut-short run keeps its rounds
    print(json.dumps({"median_tokens_per_s": median, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
