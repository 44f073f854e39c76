"""Prometheus exposition: the only module that knows Prometheus.

Events (finished requests, steps) arrive from the engine's listeners on the engine thread and
update counters and histograms; gauges are read at scrape time from the engine's published
snapshot. The router-facing gauges use vLLM's names so a loraserve pod is a drop-in endpoint
for the Gateway API Inference Extension's endpoint picker.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from server.engine.llm_engine import LLMEngine
from server.engine.stats import RequestStats, StepStats

BASE_LABEL, OVERFLOW_LABEL = "__base__", "__other__"  # not valid adapter names: cannot collide
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_PER_TOKEN = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)
_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_TOKENS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

request_log = logging.getLogger("loraserve.requests")


class AdapterLabels:
    """Adapter names are user-chosen: the first `cap` seen get their own label value, the rest
    share one overflow value, so a flood of uploads cannot blow up the series count."""

    def __init__(self, cap: int):
        self.cap, self._known, self._lock = cap, set(), threading.Lock()

    def __call__(self, adapter: str | None) -> str:
        if adapter is None:
            return BASE_LABEL
        with self._lock:
            if adapter in self._known or len(self._known) < self.cap:
                self._known.add(adapter)
                return adapter
        return OVERFLOW_LABEL


class Metrics:
    """All of one app's metrics, in its own registry (so tests can build several apps)."""

    def __init__(self, max_adapter_labels: int = 100):
        self.registry = CollectorRegistry()
        self.adapter_label = AdapterLabels(max_adapter_labels)
        r = self.registry
        self.requests = Counter(
            "loraserve:requests",
            "Finished requests by adapter and finish reason (stop, length, abort).",
            ["adapter", "finish_reason"],
            registry=r,
        )
        self.success = Counter(
            "vllm:request_success",
            "Requests that finished normally, by reason (vLLM's name).",
            ["finished_reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Arrival to first output token.", buckets=_LATENCY, registry=r
        )
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Mean time between output tokens, per request.",
            buckets=_PER_TOKEN,
            registry=r,
        )
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", buckets=_LATENCY, registry=r)
        self.queue = Histogram(
            "vllm:request_queue_time_seconds", "Arrival to first scheduled.", buckets=_LATENCY, registry=r
        )
        self.adapter_latency = Histogram(
            "loraserve:adapter_request_latency_seconds",
            "Arrival to finish, per adapter.",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )
        self.adapter_prompt_tokens = Counter(
            "loraserve:adapter_prompt_tokens",
            "Prompt tokens of finished requests, per adapter.",
            ["adapter"],
            registry=r,
        )
        self.adapter_generation_tokens = Counter(
            "loraserve:adapter_generation_tokens",
            "Output tokens of finished requests, per adapter.",
            ["adapter"],
            registry=r,
        )
        self.steps = Counter(
            "loraserve:engine_steps", "Engine steps by LoRA mode (base, merged, gather).", ["mode"], registry=r
        )
        self.swap = Histogram(
            "loraserve:adapter_swap_seconds",
            "Time to merge an adapter into the weights.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.step_time = Histogram(
            "loraserve:step_duration_seconds", "Duration of one engine step.", buckets=_LATENCY, registry=r
        )
        self.batch_size = Histogram(
            "loraserve:batch_size", "Sequences in one engine step.", buckets=_COUNTS, registry=r
        )
        self.step_tokens = Histogram(
            "vllm:iteration_tokens_total", "Tokens in one engine step.", buckets=_TOKENS, registry=r
        )
        self.resolutions = Counter(
            "loraserve:adapter_source_resolutions",
            "Lookups of unknown adapters in a configured source, by outcome (resolved, absent, invalid, unavailable).",
            ["source", "outcome"],
            registry=r,
        )
        self.resolve_latency = Histogram(
            "loraserve:adapter_source_resolve_seconds",
            "A first request's wait for its adapter: fetch, validation, store write and install.",
            ["source"],
            buckets=_LATENCY,
            registry=r,
        )
        self.fetch_latency = Histogram(
            "loraserve:adapter_source_fetch_seconds",
            "The fetch part of a resolution (reading the source); the rest is validation, store and install.",
            ["source"],
            buckets=_LATENCY,
            registry=r,
        )
        self.fetched_bytes = Counter(
            "loraserve:adapter_source_fetched_bytes", "Adapter bytes fetched from each source.", ["source"], registry=r
        )
        self.store_bytes = Gauge(
            "loraserve:adapter_store_bytes",
            "Bytes of the adapter store's current versions.",
            registry=r,
        )
        self.evictions = Counter(
            "loraserve:adapter_store_evictions", "Resolved adapters evicted to keep the store in budget.", registry=r
        )
        self.prefix_cache_by_adapter: dict[str, list[int]] = {}  # label -> [queried, hit] tokens, finished requests
        self._resolve_waits: dict[str, float] = {}  # request id -> seconds it waited for its adapter's resolution
        self._engine: LLMEngine | None = None
        r.register(_SnapshotCollector(self))

    def attach(self, engine: LLMEngine) -> None:
        """Start receiving the engine's events (called once the engine exists)."""
        self._engine = engine
        engine.request_listeners.append(self.on_request)
        engine.step_listeners.append(self.on_step)

    def on_resolution(
        self, source: str, outcome: str, seconds: float, num_bytes: int, fetch_seconds: float | None = None
    ) -> None:
        """One lookup in one source (labels: the operator's source URIs, a handful at most)."""
        self.resolutions.labels(source, outcome).inc()
        if outcome == "resolved":
            self.resolve_latency.labels(source).observe(seconds)
            self.fetched_bytes.labels(source).inc(num_bytes)
            if fetch_seconds is not None:
                self.fetch_latency.labels(source).observe(fetch_seconds)

    def note_resolve_wait(self, request_id: str, seconds: float) -> None:
        """The request's log line will say it waited `seconds` for its adapter's resolution."""
        while len(self._resolve_waits) >= 10_000:  # a request that never finishes must not pin its entry
            del self._resolve_waits[next(iter(self._resolve_waits))]
        self._resolve_waits[request_id] = seconds

    def on_store_budget(self, stored_bytes: int, num_evicted: int) -> None:
        self.store_bytes.set(stored_bytes)
        self.evictions.inc(num_evicted)

    def on_request(self, stats: RequestStats) -> None:
        adapter = self.adapter_label(stats.adapter)
        self.requests.labels(adapter, stats.finish_reason or "unknown").inc()
        if stats.finish_reason in ("stop", "length"):
            self.success.labels(stats.finish_reason).inc()
        for histogram, value in (
            (self.ttft, stats.time_to_first_token),
            (self.tpot, stats.time_per_output_token),
            (self.e2e, stats.e2e_latency),
            (self.queue, stats.queue_time),
        ):
            if value is not None:
                histogram.observe(value)
        self.adapter_latency.labels(adapter).observe(stats.e2e_latency)
        self.adapter_prompt_tokens.labels(adapter).inc(stats.num_prompt_tokens)
        self.adapter_generation_tokens.labels(adapter).inc(stats.num_output_tokens)
        if stats.prefix_cache_queries:
            counts = self.prefix_cache_by_adapter.setdefault(adapter, [0, 0])
            counts[0] += stats.prefix_cache_queries
            counts[1] += stats.prefix_cache_hits
        resolve_wait = self._resolve_waits.pop(stats.request_id, None)
        request_log.info(
            "request %s adapter=%s finish=%s prompt_tokens=%d output_tokens=%d e2e=%.3fs%s",
            stats.request_id,
            stats.adapter or "-",
            stats.finish_reason,
            stats.num_prompt_tokens,
            stats.num_output_tokens,
            stats.e2e_latency,
            "" if resolve_wait is None else f" resolve={resolve_wait:.3f}s",
            extra={
                "fields": {
                    "request_id": stats.request_id,
                    "adapter": stats.adapter,
                    "outcome": stats.finish_reason,
                    "prompt_tokens": stats.num_prompt_tokens,
                    "output_tokens": stats.num_output_tokens,
                    "queue_time": stats.queue_time,
                    "ttft": stats.time_to_first_token,
                    "e2e": stats.e2e_latency,
                    "preemptions": stats.num_preemptions,
                    "resolve_time": resolve_wait,  # seconds spent resolving its adapter first (None: none)
                }
            },
        )

    def on_step(self, stats: StepStats) -> None:
        self.steps.labels(stats.mode).inc()
        self.step_time.observe(stats.duration)
        self.batch_size.observe(stats.num_seqs)
        self.step_tokens.observe(stats.num_tokens)
        if stats.swap_seconds is not None:
            self.swap.observe(stats.swap_seconds)


class _SnapshotCollector(Collector):
    """Gauges and engine-side counters, read from the engine's latest published snapshot."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        engine = self.metrics._engine
        if engine is None:
            return
        s = engine.snapshot
        yield _gauge("vllm:num_requests_running", "Requests in the running batch.", s.num_running)
        yield _gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield _gauge("vllm:kv_cache_usage_perc", "KV cache usage, 0 to 1 (tokens held / capacity).", s.kv_usage)
        yield _gauge(
            "vllm:gpu_cache_usage_perc", "Alias of vllm:kv_cache_usage_perc for older endpoint pickers.", s.kv_usage
        )
        yield _gauge(
            "loraserve:kv_cache_used_tokens", "Tokens whose K/V running requests hold (in use).", s.kv_used_tokens
        )
        yield _gauge(
            "loraserve:kv_cache_cached_tokens",
            "Tokens of prefix-cache blocks no request holds: "
            "reusable, and evicted as soon as room is needed (not in vllm:kv_cache_usage_perc).",
            s.kv_cached_tokens,
        )
        yield _counter(
            "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries
        )
        yield _counter(
            "vllm:prefix_cache_hits", "Of those, tokens found in the cache (prefill skipped).", s.prefix_cache_hits
        )
        yield _counter(
            "loraserve:prefix_cache_evictions",
            "Cached prefix blocks evicted to make room.",
            s.num_prefix_cache_evictions,
        )
        yield from self._prefix_cache_by_adapter()
        yield _gauge("loraserve:kv_cache_capacity_tokens", "KV cache capacity in tokens.", s.kv_capacity_tokens)
        plan = GaugeMetricFamily(
            "loraserve:memory_plan_bytes",
            "The startup memory plan: bytes per part (budget, weights, lora_slots, merge_buffers, "
            "activations, cuda_graphs, kv_cache).",
            labels=["part"],
        )
        for part, value in s.memory_plan.items():
            plan.add_metric([part], value)
        yield plan
        yield _gauge(
            "loraserve:merge_buffer_bytes",
            "Bytes merge buffers hold now (within the plan's share).",
            s.merge_buffer_bytes,
        )
        yield _counter("vllm:num_preemptions", "Sequences preempted (KV dropped, recomputed later).", s.num_preemptions)
        yield _counter("vllm:prompt_tokens", "Prompt tokens scheduled.", s.num_prompt_tokens)
        yield _counter("vllm:generation_tokens", "Output tokens generated.", s.num_generation_tokens)
        yield _counter("loraserve:adapter_swaps", "Merges of an adapter into the weights.", s.num_swaps)
        yield _counter("loraserve:adapter_loads", "Copies of an adapter into a device slot.", s.num_adapter_loads)
        yield _counter(
            "loraserve:adapter_evictions", "Device slots taken from an idle adapter.", s.num_adapter_evictions
        )
        yield _gauge("loraserve:adapter_slots_used", "Device slots holding an adapter.", len(s.resident_adapters))
        yield _gauge("loraserve:adapter_slots_total", "Device slots (max_loras).", s.max_loras)
        yield _gauge("loraserve:adapter_host_cache_used", "Adapters parsed in host memory.", len(s.host_adapters))
        yield _gauge(
            "loraserve:adapter_host_cache_total", "Host-memory adapter cache size (max_cpu_loras).", s.max_cpu_loras
        )
        yield _gauge("loraserve:adapters_registered", "Adapters that can be requested.", s.num_registered_adapters)
        # Every adapter label goes through the cap, here too: names are user-chosen.
        device, host = self._labels(s.resident_adapters), self._labels(s.host_adapters)
        resident = GaugeMetricFamily(
            "loraserve:adapter_resident",
            "Adapters in a tier (device, host); names past the label cap are counted under one label.",
            labels=["adapter", "tier"],
        )
        for tier, labels in (("device", device), ("host", host)):
            for label in sorted(set(labels)):
                resident.add_metric([label, tier], labels.count(label))
        yield resident
        yield from self._adapter_sizes(s.adapter_sizes)
        now = time.time()
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "LoRA adapters of running and waiting requests; the value is the Unix time of this update.",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        info.add_metric([str(s.max_loras), self._joined(s.running_adapters), self._joined(s.waiting_adapters)], now)
        yield info
        warm = GaugeMetricFamily(
            "loraserve:lora_resident_info",
            "Adapters resident in device slots and in host "
            "memory even when idle (a warm pod); the value is the Unix time of this update.",
            labels=["max_lora", "resident_lora_adapters", "host_lora_adapters"],
        )
        warm.add_metric([str(s.max_loras), ",".join(sorted(set(device))), ",".join(sorted(set(host)))], now)
        yield warm

    def _labels(self, names: list[str]) -> list[str]:
        return [self.metrics.adapter_label(name) for name in names]

    def _joined(self, names: list[str]) -> str:
        """vLLM's comma-joined list, of capped labels: an endpoint picker reads names it routed by."""
        return ",".join(sorted(set(self._labels(names))))

    def _prefix_cache_by_adapter(self):
        """Per adapter label, from finished requests: the counters and their ratio, the hit rate."""
        queries = CounterMetricFamily(
            "loraserve:adapter_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache, per adapter (finished requests).",
            labels=["adapter"],
        )
        hits = CounterMetricFamily(
            "loraserve:adapter_prefix_cache_hits",
            "Of those, tokens found in the cache, per adapter.",
            labels=["adapter"],
        )
        rate = GaugeMetricFamily(
            "loraserve:adapter_prefix_cache_hit_rate",
            "Prefix-cache hits / queries in tokens, per adapter, since start.",
            labels=["adapter"],
        )
        by_adapter = dict(self.metrics.prefix_cache_by_adapter)  # copied in one C call: the engine thread adds
        for label, (num_queries, num_hits) in sorted(by_adapter.items()):
            queries.add_metric([label], num_queries)
            hits.add_metric([label], num_hits)
            rate.add_metric([label], num_hits / num_queries)
        yield queries
        yield hits
        yield rate

    def _adapter_sizes(self, sizes: dict[str, tuple[int, int]]):
        """Rank and parameter count per resident adapter, so a compression shows in dashboards; names
        past the label cap share the overflow label (largest rank, summed parameters)."""
        by_label: dict[str, tuple[int, int]] = {}
        for name, (rank, num_params) in sizes.items():
            label = self.metrics.adapter_label(name)
            old_rank, old_params = by_label.get(label, (0, 0))
            by_label[label] = (max(old_rank, rank), old_params + num_params)
        rank = GaugeMetricFamily(
            "loraserve:adapter_rank", "Largest layer rank of each resident adapter.", labels=["adapter"]
        )
        params = GaugeMetricFamily(
            "loraserve:adapter_params", "LoRA parameters (A and B) of each resident adapter.", labels=["adapter"]
        )
        for label, (num_rank, num_params) in sorted(by_label.items()):
            rank.add_metric([label], num_rank)
            params.add_metric([label], num_params)
        yield rank
        yield params


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
