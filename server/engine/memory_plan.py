"""The device memory plan: weights, adapter slots, merge buffers, activations and CUDA graphs each
get their share of a budget, and the KV pool gets what is left (vLLM's --gpu-memory-utilization).

Everything the engine allocates after startup is counted here before the pool is sized, so a
merge, an adapter load or a captured graph never takes memory the KV plan counted on: slots are
counted at their full size although they fill lazily, and merges stay within `merge_memory`
(LoraModel.merge_budget), above which an adapter is served gathered.

On CUDA the budget is `gpu_memory_utilization` of the device, less what other processes hold; on
CPU there is none unless `memory_budget` gives one, and the pool is `kv_cache_tokens` (16384 by
default), as before the plan existed.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from adapters import LoraModel

from .attention_probe import AttentionShape
from .config import EngineConfig
from .decode_graphs import graph_bytes, graphs_capture
from .kv_cache import PAGE_TOKENS

log = logging.getLogger(__name__)

CPU_KV_TOKENS = 16384  # the pool on a device without a budget, unless kv_cache_tokens says otherwise
MIN_KV_TOKENS = 1024  # a plan that leaves less than this for the KV pool is refused at startup
MERGE_SHARE = 0.1  # merge_memory's default on a budgeted device: this share of the budget
MiB = 2**20


class MemoryPlanError(ValueError):
    """The configuration does not fit the device's budget; the message names the parts."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per part; `budget` None: no budget (CPU by default), the pool is what was asked."""

    budget: int | None
    weights: int
    lora_slots: int
    merge_buffers: int  # the most merges may hold: LoraModel.merge_budget (None: unlimited, CPU)
    activations: int
    cuda_graphs: int
    kv_cache: int
    kv_tokens: int

    def parts(self) -> dict[str, int]:
        """What the metrics export: every part with a size (a missing budget is left out)."""
        return {name: value for name, value in asdict(self).items() if name != "kv_tokens" and value is not None}

    def describe(self) -> str:
        """The startup log line."""
        parts = ", ".join(f"{name} {value / MiB:,.0f} MiB" for name, value in self.parts().items())
        return f"memory plan: {parts}; KV pool {self.kv_tokens:,} tokens"


def plan_memory(
    lora_model: LoraModel, model_config, attention: AttentionShape, config: EngineConfig, captures_graphs: bool
) -> MemoryPlan:
    """The plan for a loaded, wrapped model whose attention layers are `attention` (as the probe
    found them) under `config` on its device. With captured decode graphs merges are off unless
    `merge_memory` asks for them: a merged step cannot replay a graph (decode_graphs.py), and
    eager launches cost more than the LoRA kernels save. A family whose decode steps are never
    captured (no lean pass, a rotary update on the host) reserves nothing for graphs and merges."""
    device, dtype = lora_model.device, lora_model.dtype
    budget = config.memory_budget if config.memory_budget is not None else device_budget(device, config)
    kv_per_token = attention.kv_bytes_per_token(dtype)
    weights, slots = model_bytes(lora_model.model), slot_bytes(lora_model)
    captures_graphs = captures_graphs and graphs_capture(lora_model.model)
    graphs = 0
    if captures_graphs and device.type == "cuda":
        graphs = graph_bytes(config.max_num_seqs, model_config.vocab_size, dtype)
    share = 0.0 if captures_graphs else MERGE_SHARE
    if budget is None:
        kv_tokens = config.kv_cache_tokens or CPU_KV_TOKENS
        merge = config.merge_memory  # None: merges are not limited (the CPU's behaviour before plans)
        merge = 0 if merge is None and captures_graphs else merge
        activations = activation_bytes(model_config, dtype, config)
        return MemoryPlan(None, weights, slots, merge, activations, graphs, kv_tokens * kv_per_token, kv_tokens)
    merge = config.merge_memory if config.merge_memory is not None else int(share * budget)
    activations = activation_bytes(model_config, dtype, config)
    free = budget - weights - slots - merge - activations - graphs
    kv_tokens = (max(free, 0) // kv_per_token) // PAGE_TOKENS * PAGE_TOKENS
    if config.kv_cache_tokens is not None:
        if config.kv_cache_tokens > kv_tokens:
            raise MemoryPlanError(_overflow(f"kv_cache_tokens {config.kv_cache_tokens:,}", kv_tokens, budget))
        kv_tokens = config.kv_cache_tokens
    elif kv_tokens < MIN_KV_TOKENS:
        raise MemoryPlanError(_overflow(f"the minimum KV pool of {MIN_KV_TOKENS:,} tokens", kv_tokens, budget))
    return MemoryPlan(budget, weights, slots, merge, activations, graphs, kv_tokens * kv_per_token, kv_tokens)


def _overflow(wanted: str, fits: int, budget: int) -> str:
    return (
        f"{wanted} does not fit: the memory budget of {budget / MiB:,.0f} MiB leaves room for {fits:,} KV "
        "tokens after the weights, adapter slots, merge buffers and activations; raise "
        "--gpu-memory-utilization (or --memory-budget), or lower --merge-memory, --max-loras, "
        "--max-lora-rank or --max-num-batched-tokens"
    )


def device_budget(device: torch.device, config: EngineConfig) -> int | None:
    """CUDA: `gpu_memory_utilization` of the device, less what other processes hold; else None."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    others = total - free - torch.cuda.memory_reserved(device)  # the weights loaded so far are ours
    return int(config.gpu_memory_utilization * total) - others


def model_bytes(model: nn.Module) -> int:
    """Parameters and buffers, each storage once (tied weights, packed copies share nothing else)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def slot_bytes(lora_model: LoraModel) -> int:
    """A and B of every slot of every layer at the largest rank, allocated or not yet."""
    per_slot = sum(layer.in_features + layer.out_features for layer in lora_model.layers.values())
    per_slot += sum(  # MoE experts: a pair per expert (adapters/experts.py)
        max(getattr(layer, "num_experts", 1), 1) * (layer.in_features + layer.out_features)
        for layer in lora_model.params.values()
    )
    return lora_model.max_loras * lora_model.max_rank * per_slot * lora_model.dtype.itemsize


def activation_bytes(model_config, dtype: torch.dtype, config: EngineConfig) -> int:
    """A step's peak activations, estimated: a layer's hidden states, Q/K/V and MLP intermediates
    for max_num_batched_tokens rows (one layer lives at a time), plus fp32 logits and the
    sampler's copies for max_num_seqs rows."""
    hidden = model_config.hidden_size
    inter = getattr(model_config, "intermediate_size", None) or 4 * hidden  # GPT-2, GPT-J, Falcon: none, 4x
    per_token = (6 * hidden + 3 * inter) * dtype.itemsize
    logits = 3 * config.max_num_seqs * model_config.vocab_size * 4
    return config.max_num_batched_tokens * per_token + logits
