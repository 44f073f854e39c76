"""Decode steps replayed from CUDA graphs captured per batch-size bucket (nano-vllm's and vLLM's).

A decode step does the same work each time for a given number of rows: one token per row through
the lean forward (lean_forward.py) with the row kernels, attention over each row's own KV extent
and LoRA by each row's own slot. So its launches are captured once per bucket and replayed: the
host writes the step's inputs (token, position, KV write position, KV extent, adapter slot and
scale per term) into static buffers, and the GPU runs every layer with no launch overhead. Slots,
scales and KV locations are data, not shapes, so one graph serves any mix of adapters; graphs are
keyed by bucket and term depth only (0: every row base, 1: one adapter per row, more: compositions).
Rows past the step's count pad the bucket: base slot, no keys (kv_len 0), KV written to the pool's
scratch page.

Prefill, chunked prompts, prompt logprobs, merged weights (a merge moves the weights the graph
read), adapters the row kernels do not cover (embedding LoRA, saved module copies) and compositions
deeper than MAX_GRAPH_TERMS run eagerly. Off CUDA nothing is captured, nor where the rotary
embedding's update compares a tensor on the host (rope types "dynamic" and "longrope" under the lean
pass): the same static-buffer step runs eagerly, which is how its bookkeeping is tested on CPU.

Each graph keeps its own [bucket, vocab] logits (the pool reuses everything else), so what the
graphs hold grows with the vocabulary, the buckets and the depths captured: `graph_bytes`, which
the memory plan reserves.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from adapters import BASE_SLOT, LoraBatch, LoraModel
from adapters.embedding import LoraEmbedding

from .attention import KVStep
from .kv_cache import KVCache
from .lean_forward import LeanForward
from .sequence import Sequence

if TYPE_CHECKING:
    from adapters.lora_kernels import LoraRows

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, *range(16, 257, 16), *range(288, 1025, 32))
MAX_GRAPH_TERMS = 2  # deeper compositions run eagerly: each captured depth holds its own logits per bucket
GRAPH_WORKSPACE_BYTES = 64 * 2**20  # cuBLAS and Triton workspace, the graphs' static inputs
HOST_ROPE_UPDATES = ("dynamic", "longrope")  # their update compares the longest position on the host


def buckets_for(max_rows: int) -> list[int]:
    return [b for b in BUCKETS if b < max_rows] + [max_rows]


def graphs_capture(model) -> bool:
    """Whether decode steps of `model` can be captured: a family with the lean pass (the stock
    forward's wrappers are not captured), and a rotary embedding with no host-side update."""
    from .lean_forward import SUPPORTED

    if type(model).__name__ not in SUPPORTED:
        return False
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    rope_type = getattr(rotary, "rope_type", "default")
    return not any(kind in str(rope_type) for kind in HOST_ROPE_UPDATES)


def graph_bytes(max_rows: int, vocab_size: int, dtype: torch.dtype) -> int:
    """What captured decode graphs hold: each keeps its [bucket, vocab] logits, for every bucket and
    every depth 0..MAX_GRAPH_TERMS, plus a workspace."""
    logits_rows = sum(buckets_for(max_rows)) * (MAX_GRAPH_TERMS + 1)
    return logits_rows * vocab_size * dtype.itemsize + GRAPH_WORKSPACE_BYTES


@dataclass
class _Graph:
    rows: LoraRows | None  # the bucket's rows sorted by slot (None: depth 0, every row base)
    graph: torch.cuda.CUDAGraph | None = None  # None off CUDA
    logits: torch.Tensor | None = None  # the graph's output buffer


class DecodeGraphs:
    """run(seqs) -> logits [len(seqs), V] of a decode step, from the bucket's graph."""

    def __init__(self, lean: LeanForward, lora_model: LoraModel, cache: KVCache, max_rows: int, max_terms: int):
        self.lean, self.lora_model, self.cache = lean, lora_model, cache
        self.buckets = buckets_for(max_rows)
        self.max_terms = min(max_terms, MAX_GRAPH_TERMS)
        self.capture = lora_model.device.type == "cuda" and graphs_capture(lora_model.model)
        if lora_model.device.type == "cuda" and not self.capture:
            log.info("decode steps run eagerly: this model's rotary embedding updates on the host")
        device = lora_model.device
        # ids, positions, KV write positions (long: embedding and index_copy_ take them) ...
        self.longs = torch.zeros(3, max_rows, dtype=torch.long, device=device)
        # ... each row's KV start and length, then its slot in each term (int32, as the kernels read them)
        self.ints = torch.zeros(2 + self.max_terms, max_rows, dtype=torch.int32, device=device)
        self.scales = torch.ones(self.max_terms, max_rows, dtype=torch.float32, device=device)
        self.all_rows = torch.arange(max_rows, device=device)
        self.embeddings = [layer for layer in lora_model.layers.values() if isinstance(layer, LoraEmbedding)]
        self.graphs: dict[tuple[int, int], _Graph] = {}  # by (bucket, term depth)
        self.pool = None  # one memory pool shared by every graph (they never run at once)
        self.layout: int | None = None  # the LoRA buffers' layout_version the graphs were made for
        self.replays: Counter[tuple[int, int]] = Counter()  # decode steps run, by (bucket, depth)

    def can_run(self, scheduled: list[tuple[Sequence, int]]) -> bool:
        """Whether this step is a decode step the graphs cover: one new token per row, unmerged
        weights, and no row on an adapter the row kernels do not cover (embedding LoRA, module copies)."""
        model = self.lora_model
        if len(scheduled) > self.buckets[-1] or model.merged is not None:
            return False
        if any(num_new != 1 or seq.params.prompt_logprobs is not None for seq, num_new in scheduled):
            return False
        slots = {slot for seq, _ in scheduled for slot, _ in seq.slot_mix}
        if any(len(seq.slot_mix) > self.max_terms for seq, _ in scheduled) or slots & model.copy_slots:
            return False
        return not any(layer.slot_ranks[slot] for layer in self.embeddings for slot in slots)

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        num_rows = len(seqs)
        bucket = next(b for b in self.buckets if b >= num_rows)
        depth = max(len(seq.slot_mix) for seq in seqs)
        if self.layout != self.lora_model.state.layout_version:
            self.capture_all()  # new slot buffers or tables: the old graphs would skip their ops
        self._fill(seqs, bucket, depth)
        key = (bucket, depth)
        if key not in self.graphs:
            self.graphs[key] = self._prepare(bucket, depth)
        entry = self.graphs[key]
        self.replays[key] += 1
        if entry.graph is None:  # off CUDA: the same step, eagerly
            return self._forward(bucket, entry.rows)[:num_rows]
        entry.graph.replay()
        return entry.logits[:num_rows]

    def capture_all(self) -> None:
        """(Re)capture every bucket's base and single-adapter graphs at once: at startup, and when
        the LoRA buffers' layout changed (the first adapter of a kind loaded), so requests do not
        each wait on a bucket's capture. Compositions' deeper graphs are captured on first use."""
        self.graphs.clear()
        self.pool = None
        self.layout = self.lora_model.state.layout_version
        self._fill([], self.buckets[-1], 1)  # every row padding: a capture's warm-up run writes only the scratch page
        for bucket in self.buckets:
            for depth in (0, 1):
                self.graphs[(bucket, depth)] = self._prepare(bucket, depth)
        if self.capture:
            log.info("captured decode graphs for %d batch sizes up to %d rows", len(self.buckets), self.buckets[-1])

    def _fill(self, seqs: list[Sequence], bucket: int, depth: int) -> None:
        """The step's inputs into the static buffers; padding rows up to `bucket`. Only the `depth`
        terms the step's graph reads are written: its lists are (2 + depth) × bucket."""
        scratch = self.cache.scratch_token
        longs = [[0] * bucket, [0] * bucket, [scratch] * bucket]
        ints = [[0] * bucket, [0] * bucket] + [[BASE_SLOT] * bucket for _ in range(depth)]
        scales = [[1.0] * bucket for _ in range(depth)]
        for row, seq in enumerate(seqs):
            position, start = seq.num_computed, self.cache.start(seq.seq_id)
            longs[0][row], longs[1][row], longs[2][row] = seq.all_token_ids[position], position, start + position
            ints[0][row], ints[1][row] = start, position + 1
            for term, (slot, scale) in enumerate(seq.slot_mix):
                ints[2 + term][row], scales[term][row] = slot, scale
        self.longs[:, :bucket].copy_(torch.tensor(longs), non_blocking=True)
        self.ints[: 2 + depth, :bucket].copy_(torch.tensor(ints, dtype=torch.int32), non_blocking=True)
        if depth:
            self.scales[:depth, :bucket].copy_(torch.tensor(scales), non_blocking=True)

    def _prepare(self, bucket: int, depth: int) -> _Graph:
        """The bucket's row metadata and, on CUDA, its captured graph and output."""
        rows = None
        if depth:
            from adapters.lora_kernels import LoraRows  # Triton: imported only where rows are used

            slots, scales = self.ints[2 : 2 + depth, :bucket], self.scales[:depth, :bucket]
            rows = LoraRows.build(slots, scales, self.lora_model.max_loras)
        if not self.capture:
            return _Graph(rows)
        # Compiles the Triton kernels and warms cuBLAS outside the capture. It runs on the buffers as
        # they are: all padding (capture_all), or this step's rows, whose K/V it writes as the replay will.
        self._forward(bucket, rows)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(bucket, rows)
        self.pool = graph.pool()
        return _Graph(rows, graph, logits)

    def _forward(self, bucket: int, rows: LoraRows | None) -> torch.Tensor:
        """The captured work: sort the rows by slot (inside the graph, so each replay re-sorts), then
        the lean forward over the static inputs, every row kept."""
        batch = None
        if rows is not None:
            depth = rows.token_slots.shape[0]
            rows.fill_(self.ints[2 : 2 + depth, :bucket], self.scales[:depth, :bucket])
            batch = LoraBatch(runs=[], groups=None, num_tokens=bucket, rows=rows)
        ids, positions, write = self.longs[:, :bucket]
        step = KVStep(self.cache, [], write, (self.ints[0, :bucket], self.ints[1, :bucket]))
        with self.lora_model.gather(batch):
            return self.lean(ids, positions, self.all_rows[:bucket], step)
