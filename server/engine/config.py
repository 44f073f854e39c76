"""Engine capacity and policy knobs (no torch here: the CLI reads them without loading it)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ByteSize, Field


class EngineSettings(BaseModel):
    """The engine knobs an operator sets: each is also a server setting (server/http/settings.py
    inherits them, so each is a --flag and a LORASERVE_* variable) and is declared only here."""

    max_loras: int = Field(4, ge=1)  # device slots = most distinct adapters in one step
    max_lora_rank: int = Field(64, ge=1)
    max_cpu_loras: int = Field(16, ge=0)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)  # per step: bounds how long prefill stalls decodes
    # The memory plan (memory_plan.py). kv_cache_tokens None: sized from the budget where there is one
    # (CUDA: gpu_memory_utilization of the device; anywhere: memory_budget), else 16384 tokens.
    kv_cache_tokens: int | None = Field(None, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # vLLM's: the share of the GPU this engine may use
    memory_budget: ByteSize | None = None  # bytes for everything (weights included), on any device: "8GiB"
    # Merge buffers' most (W0 + delta copies of the targeted weights), past which an adapter is served
    # gathered; None: 10% of the budget where there is one, else no limit.
    merge_memory: ByteSize | None = None
    max_model_len: int | None = Field(None, ge=1)
    max_waiting: int = Field(1024, ge=1)
    # Reuse prompts' K/V across requests of one adapter identity (vLLM's --[no-]enable-prefix-caching).
    enable_prefix_caching: bool = True
    block_size: int = Field(16, ge=16, multiple_of=16)  # tokens per prefix-cache block, 16 = a KV page (vLLM's)
    # Base kernels (adapters/kernel_plan.py). packed: oneDNN-packed base weights on CPU fp32/bf16 at every
    # row count (+1 weight copy); plain: never packed; auto: measured per weight shape on this machine once
    # (cached in cache_dir), the server's default. The engine's default keeps tests deterministic.
    kernel_choice: Literal["auto", "packed", "plain"] = "packed"
    # Attention and LoRA as one Triton kernel call per layer over every row of a step (row_attention.py,
    # adapters/lora_kernels.py); auto: on CUDA. torch: per-sequence SDPA and runs/groups of matmuls.
    step_kernels: Literal["auto", "triton", "torch"] = "auto"
    enforce_eager: bool = False  # vLLM's: no CUDA graphs for decode steps (decode_graphs.py)
    quantization: Literal["none", "int8"] = "none"  # int8: weight-only int8 base linears (adapters/kernel_plan.py)
    # Where GGUF models are converted and measured kernel choices kept; None: model_loader's default.
    cache_dir: Path | None = None


class EngineConfig(EngineSettings):
    """Everything the engine reads: the operator's knobs, plus policy that only tests and benchmarks tune."""

    merge_after_steps: int = Field(4, ge=1)  # hysteresis before merging a single adapter
    max_bypass_steps: int = Field(16, ge=0)  # fairness bound for requests waiting on an adapter slot
    # Decode steps through DecodeGraphs' static buffers; None: on CUDA with the row kernels unless
    # enforce_eager. True off CUDA runs the same bookkeeping eagerly (what its CPU tests check).
    decode_graphs: bool | None = None
