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
    enforce_eager: bool = False  # vLLM's: no CUDA graphs (decode_graphs.py), no compiled CPU step (compiled_step.py)
    # CPU decode steps on base or merged weights through one torch.compile'd forward (compiled_step.py):
    # auto: where measured faster on this CPU (once, cached in cache_dir), the server's default; on; off.
    # The engine's default keeps tests fast (no compile).
    compile_decode: Literal["auto", "on", "off"] = "off"
    # int8: weight-only int8 base linears; q4_1: llama.cpp's Q4_1 linears and Q8_0 head (adapters/kernel_plan.py)
    quantization: Literal["none", "int8", "q4_1"] = "none"
    # Where GGUF models are converted and measured kernel choices kept; None: model_loader's default.
    cache_dir: Path | None = None
    # Structured output (docs/structured-output.md): what one request's grammar may cost; past a limit
    # the request is a 400 naming the setting. The defaults pass every realistic schema, tool set and
    # grammar measured, and keep llguidance far from its native stack overflow (a 2,500-rule chain
    # crashes on an 8 MiB stack; 1,000 rules need about 3 MiB). Each grammar is checked first in a
    # worker process (grammar_workers.py), so one that crashes or runs away fails only its request.
    max_grammar_bytes: int = Field(256 * 1024, ge=1)  # source: schema JSON, regex, Lark or GBNF text
    max_grammar_rules: int = Field(1000, ge=1)  # Lark rules and terminals; a JSON schema's objects + $refs
    max_json_depth: int = Field(64, ge=1, le=256)  # JSON nesting of a schema or tool call (checks recurse)
    max_regex_length: int = Field(8192, ge=1)  # characters of a regex (structured_outputs.regex, a pattern)
    max_choices: int = Field(2000, ge=1)  # entries of structured_outputs.choice
    max_grammar_compile_fuel: int = Field(200_000, ge=1)  # lexer work for a first mask (~0.3 s at most)
    max_grammar_step_fuel: int = Field(50_000, ge=1)  # lexer work per token: a few ms at most
    max_grammar_step_items: int = Field(2000, ge=1)  # parser items per token: ~10 ms at most
    grammar_compile_timeout: float = Field(5.0, gt=0)  # seconds a worker may spend checking one grammar
    grammar_compile_memory: ByteSize = Field(1 << 30, ge=256 << 20)  # address space of each worker
    grammar_workers: int = Field(2, ge=1)  # worker processes; each holds ~75 MB once started


class EngineConfig(EngineSettings):
    """Everything the engine reads: the operator's knobs, plus policy that only tests and benchmarks tune."""

    merge_after_steps: int = Field(4, ge=1)  # hysteresis before merging a single adapter
    # A merge pays back only over this many steps of its rows (ModePolicy's docstring has the figures)
    merge_min_steps_left: int = Field(32, ge=1)
    max_bypass_steps: int = Field(16, ge=0)  # fairness bound for requests waiting on an adapter slot
    # Decode steps through DecodeGraphs' static buffers; None: on CUDA with the row kernels unless
    # enforce_eager. True off CUDA runs the same bookkeeping eagerly (what its CPU tests check).
    decode_graphs: bool | None = None
