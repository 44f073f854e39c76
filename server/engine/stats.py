"""Plain stats objects the engine produces; only the metrics module turns them into Prometheus."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class StepStats:
    mode: str  # "base", "merged" or "gather"
    num_seqs: int
    num_tokens: int
    num_distinct_adapters: int
    duration: float
    swap_seconds: float | None  # a merge happened this step, and took this long


@dataclass(frozen=True)
class RequestStats:
    """One finished request, for per-request metrics and the request log."""

    request_id: str
    adapter: str | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    queue_time: float | None  # arrival -> first scheduled
    time_to_first_token: float | None
    e2e_latency: float
    num_preemptions: int
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache, over its admissions
    prefix_cache_hits: int = 0  # of those, tokens found there

    @property
    def time_per_output_token(self) -> float | None:
        if self.time_to_first_token is None or self.num_output_tokens < 2:
            return None
        return (self.e2e_latency - self.time_to_first_token) / (self.num_output_tokens - 1)


@dataclass
class EngineStats:
    """A snapshot: gauges as of now, counters since start."""

    num_running: int = 0
    num_waiting: int = 0
    kv_used_tokens: int = 0
    kv_reserved_tokens: int = 0  # extents held by sequences
    kv_cached_tokens: int = 0  # prefix-cache blocks no sequence holds: reusable, and free to evict
    kv_capacity_tokens: int = 0
    max_loras: int = 0
    running_adapters: list[str] = field(default_factory=list)
    waiting_adapters: list[str] = field(default_factory=list)
    num_steps: int = 0
    steps_by_mode: Counter = field(default_factory=Counter)
    num_swaps: int = 0
    swap_seconds: float = 0.0
    num_preemptions: int = 0
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_finished: int = 0
    max_cpu_loras: int = 0
    resident_adapters: list[str] = field(default_factory=list)  # in device slots
    host_adapters: list[str] = field(default_factory=list)  # parsed in host memory
    num_registered_adapters: int = 0
    adapter_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)  # resident: name -> (rank, params)
    num_adapter_loads: int = 0  # copies into a device slot
    num_adapter_evictions: int = 0  # slots taken from an idle adapter for another
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there (their prefill skipped)
    num_prefix_cache_evictions: int = 0  # cached blocks dropped to make room
    memory_plan: dict[str, int] = field(default_factory=dict)  # bytes per part (memory_plan.MemoryPlan.parts)
    merge_buffer_bytes: int = 0  # what merge buffers hold now, within memory_plan["merge_buffers"]

    @property
    def kv_usage(self) -> float:
        return self.kv_used_tokens / self.kv_capacity_tokens if self.kv_capacity_tokens else 0.0
