"""The CUDA pass (server/engine/cuda_forward.py) against the lean pass it replaces on the row
kernels, whose PEFT parity tests/engine/test_row_kernels.py checks: same greedy tokens, logprobs
within each dtype's kernel noise; fp32 and bf16, gathered and composed rows, eager and through the
decode graphs' static buffers (run eagerly off CUDA). In Triton's interpreter on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import server.engine.cuda_forward as cuda_forward_module
from server.engine.config import EngineConfig
from server.engine.cuda_forward import CudaForward
from server.engine.lean_forward import LeanForward
from server.engine.llm_engine import LLMEngine
from server.engine.model_loader import BaseModel
from support.engine import PROMPTS, fresh_model, greedy, load_tokenizer

REQUESTS = [(PROMPTS[0], None), (PROMPTS[1], "a"), (PROMPTS[2], "b"), (PROMPTS[3], (("a", 0.5), ("b", 1.0)))]
# |Δ logprob| measured between the passes on these requests: fp32 2.9e-6 (sums in another order),
# bf16 0 (the kernels round where the stock ops do). Bounds: the suite's fp32 class, and in bf16 one
# ulp of a logit below 16 in magnitude (2^-4), what one rounding moved by one would cost.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2**-4}


def run(adapter_paths, dtype, graphs):
    model = fresh_model().to(dtype)
    config = EngineConfig(step_kernels="triton", decode_graphs=graphs)
    engine = LLMEngine(BaseModel(model, load_tokenizer(), "tiny", Path("tiny")), config)
    for name, path in adapter_paths.items():
        engine.registry.add(name, path)
    prompts, adapters = zip(*REQUESTS)
    params = [greedy(6, logprobs=0) for _ in prompts]
    completions = engine.generate(list(prompts), params, list(adapters))
    return engine, [[(t.token_id, t.logprob) for t in c.logprobs] for c in completions]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
def test_the_cuda_pass_equals_the_lean_pass(adapter_paths, monkeypatch, dtype, graphs):
    engine, got = run(adapter_paths, dtype, graphs)
    assert isinstance(engine.runner.lean, CudaForward) and engine.lora_model.dtype == dtype
    monkeypatch.setattr(cuda_forward_module, "cuda_forward", lambda model, max_positions: None)
    engine, expected = run(adapter_paths, dtype, graphs)
    assert isinstance(engine.runner.lean, LeanForward)
    worst = 0.0
    for ours, theirs in zip(got, expected):
        assert [t for t, _ in ours] == [t for t, _ in theirs]
        worst = max([worst] + [abs(a - b) for (_, a), (_, b) in zip(ours, theirs)])
    print(f"{dtype} worst |Δ logprob| {worst:.3g}")
    assert worst <= TOLERANCE[dtype]
