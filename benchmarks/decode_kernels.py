"""Kernels per decoder layer in one decode step on the CUDA step path (issue 25, item 2's figure).

What is counted: every kernel a decode step launches, taken as the difference between one run of
greedy requests with k + 1 and with k tokens (exactly one more decode step), on tiny Llama models
with 4 and 2 decoder layers; half the difference between those two is the count per layer, so the
embedding, the head, the sampler and the host's copies drop out.
  - on CPU (Triton's interpreter): the torch ops dispatched (TorchDispatchMode; views and bare
    allocations launch nothing and are left out) plus the Triton kernel launches, where the ops a
    launch runs in the interpreter to copy its arguments are not counted;
  - on CUDA: the GPU's kernels, memsets and copies in the step (torch.profiler), which for a
    captured decode step are the graph's nodes. (Written without a GPU to run it on.)
The model is bf16 (CUDA's dtype: an RMSNorm's float casts are kernels there) with plain base
kernels (CPU's packed matmul, and the fusing it brings, are not CUDA's). Passes: "before", the
lean pass (lean_forward.py) on the row kernels, as decode steps ran until the CUDA pass; "after",
the CUDA pass (cuda_forward.py). Rows: 4 decoding sequences, all base, or each on one of two
rank-8 adapters that target all seven projections (q, k, v, o, gate, up, down). The decode graphs
are on: on CUDA the step is the captured one; off CUDA the same static-buffer step runs eagerly.

Usage: TRITON_INTERPRET=1 python benchmarks/decode_kernels.py [--out PATH]   (on CPU)
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # the repo first, tests/ (for tests/support) last: tests/adapters must not shadow adapters
sys.path.append(str(ROOT / "tests"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import server.engine.cuda_forward as cuda_forward_module  # noqa: E402
from adapters.backends.cpu import cpu_model_name  # noqa: E402
from server.engine.config import EngineConfig  # noqa: E402
from server.engine.llm_engine import LLMEngine  # noqa: E402
from server.engine.model_loader import BaseModel  # noqa: E402
from server.engine.sampling_params import SamplingParams  # noqa: E402
from support.engine import PROMPTS, load_tokenizer  # noqa: E402
from support.peft import make_peft_adapter  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = 3  # the k of the k + 1 and k runs
DEFAULT_OUT = Path(__file__).parent / "results" / "decode_kernels.json"
# Ops that launch nothing: a view, or memory taken without being written.
NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh", "detach"}


class KernelCount(TorchDispatchMode):
    """Counts the kernels of the ops run inside it, by name (CPU: dispatched ops and Triton launches)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.in_launch = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not (self.in_launch or name in NO_KERNEL or (func.is_view and _aliases(out, args))):
            self.counts[name] += 1  # a view-like op that copies (`to` a new dtype) is a kernel
        return out

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction

        self.original, counter = InterpretedFunction.run, self

        def run(fn, *args, **kwargs):
            counter.counts[f"triton:{fn.__name__}"] += 1
            counter.in_launch = True  # the interpreter copies the arguments with torch ops: not the GPU's work
            try:
                return counter.original(fn, *args, **kwargs)
            finally:
                counter.in_launch = False

        InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction

        InterpretedFunction.run = self.original
        return super().__exit__(*exc)


def _aliases(out, args) -> bool:
    first = out[0] if isinstance(out, (tuple, list)) else out
    source = args[0] if args else None
    if not (isinstance(first, torch.Tensor) and isinstance(source, torch.Tensor)):
        return True
    return first.untyped_storage().data_ptr() == source.untyped_storage().data_ptr()


def cuda_kernels(run) -> collections.Counter[str]:
    """The GPU's kernels, memsets and copies while `run` runs (a replayed graph's nodes included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
        run()
        torch.cuda.synchronize()
    device = torch.autograd.DeviceType.CUDA
    return collections.Counter(e.name for e in profile.events() if e.device_type == device)


def tiny_model(num_layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(load_tokenizer()), hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def step_kernels(num_layers: int, with_lora: bool, device: str, tmp: Path) -> collections.Counter[str]:
    """The kernels of one decode step of 4 rows (k + 1 tokens minus k tokens)."""
    adapters = {}
    if with_lora:
        base = tiny_model(num_layers)
        for name in ("a", "b"):
            adapters[name] = make_peft_adapter(base, tmp / f"{name}-{num_layers}", r=8, target_modules=SEVEN)
    counts = []
    for tokens in (TOKENS, TOKENS + 1):
        model = tiny_model(num_layers).to(device, torch.bfloat16)
        config = EngineConfig(step_kernels="triton", kernel_choice="plain")  # plain: no CPU-only packing or fusing
        engine = LLMEngine(BaseModel(model, load_tokenizer(), "tiny", Path("tiny")), config)
        for name, path in adapters.items():
            engine.registry.add(name, path)
        names = list(adapters) or [None]
        requests = [(PROMPTS[i], names[i % len(names)]) for i in range(4)]
        params = [SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True) for _ in requests]

        def run():
            engine.generate([p for p, _ in requests], params, [a for _, a in requests])

        if device == "cuda":
            counts.append(cuda_kernels(run))
        else:
            with KernelCount() as mode:
                run()
            counts.append(mode.counts)
    return counts[1] - counts[0]


def per_layer(with_lora: bool, device: str, tmp: Path) -> tuple[float, dict[str, float]]:
    deep, shallow = step_kernels(4, with_lora, device, tmp), step_kernels(2, with_lora, device, tmp)
    by_name = {name: (deep[name] - shallow[name]) / 2 for name in sorted(set(deep) | set(shallow))}
    by_name = {name: count for name, count in by_name.items() if count}
    return sum(by_name.values()), by_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        make_cuda_pass = cuda_forward_module.cuda_forward
        for pass_name in ("before", "after"):
            cuda_forward_module.cuda_forward = make_cuda_pass if pass_name == "after" else (lambda *_: None)
            for rows, with_lora in (("base", False), ("lora_all_seven", True)):
                total, by_name = per_layer(with_lora, device, Path(tmp))
                results.setdefault(pass_name, {})[rows] = {"kernels_per_layer": total, "by_op": by_name}
                print(f"{pass_name:6} {rows:15} {total:5.1f} kernels per decoder layer")
        cuda_forward_module.cuda_forward = make_cuda_pass
    record = {
        "benchmark": "decode_kernels",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({cpu_model_name()}), Triton interpreter",
        "counted": "CUDA profiler events of one step" if device == "cuda" else "dispatched torch ops + Triton launches",
        "torch": torch.__version__,
        "rows": 4,
        "targets": {"base": 12, "lora_all_seven": 18},
        "cpu_model": cpu_model_name(),
        "passes": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
