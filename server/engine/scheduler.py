"""Iteration-level scheduling: who runs this step, with how many tokens.

Each step: running sequences first (one decode token, or the next chunk of their prompt),
oldest first; when the KV pool cannot grow even once every unused cached prefix block is evicted,
the newest running sequence is preempted (its KV dropped, recomputed later, from its own cached
blocks where they survived). Then waiting requests are admitted in arrival order while the
token budget, `max_num_seqs`, KV room and adapter slots allow; a request's first blocks that
the prefix cache holds are copied, not computed, and cost no token budget. A request whose
adapter cannot get a slot may be bypassed by later ones for at most `max_bypass_steps` steps;
after that nothing new is admitted until it fits, so a rare adapter waits a bounded time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from adapters import AdapterCapacityError, AdapterError, AdapterRegistry

from .kv_cache import KVCache
from .prefix_cache import PrefixCache
from .sequence import SeqStatus, Sequence


@dataclass
class StepPlan:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[tuple[Sequence, AdapterError]] = field(default_factory=list)  # adapter gone or broken

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(
        self,
        cache: KVCache,
        registry: AdapterRegistry,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_bypass_steps: int,
        prefix: PrefixCache | None = None,
    ):
        self.cache, self.registry = cache, registry
        self.prefix = prefix or PrefixCache(cache, enabled=False)
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.max_bypass_steps = max_bypass_steps
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or budget == 0:
                continue
            num_new = min(seq.num_tokens - seq.num_computed, budget)
            if self._reserve_or_preempt(seq, num_new, plan):
                plan.scheduled.append((seq, num_new))
                budget -= num_new
        if not plan.preempted:  # memory is short: let the running ones finish first
            self._admit(plan, budget)
        return plan

    def finish(self, seq: Sequence) -> None:
        """Free everything the sequence holds; it leaves the schedule at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.prefix.release(seq)
        self._release(seq)
        for version, _ in seq.bound:
            self.registry.unbind(version)
        seq.status = SeqStatus.FINISHED

    def _reserve_or_preempt(self, seq: Sequence, num_new: int, plan: StepPlan) -> bool:
        while not self.cache.reserve(seq.seq_id, seq.num_computed + num_new, seq.num_computed):
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.prefix.release(seq)
        self._release(seq)
        seq.num_computed, seq.status = 0, SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit(self, plan: StepPlan, budget: int) -> None:
        blocked_head: Sequence | None = None
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if blocked_head is not None and blocked_head.num_bypassed >= self.max_bypass_steps:
                break
            try:
                has_slot = self._acquire(seq)
            except AdapterError as exc:  # removed or unreadable since the request was accepted
                self.waiting.remove(seq)
                plan.failed.append((seq, exc))
                continue
            if not has_slot:
                blocked_head = blocked_head or seq
                continue
            hits = self.prefix.match(seq)
            num_cached = len(hits) * self.prefix.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.cache.reserve(seq.seq_id, num_cached + num_new, 0, keep=self.prefix.pages(hits)):
                self._release(seq)
                break  # no KV room: keep arrival order rather than squeeze smaller ones in
            seq.num_computed = self.prefix.load(seq, hits)
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SeqStatus.RUNNING
            plan.scheduled.append((seq, num_new))
            budget -= num_new
            if blocked_head is not None:
                blocked_head.num_bypassed += 1

    def _acquire(self, seq: Sequence) -> bool:
        """Every bound version in a slot at once, or none held (no slot hoarding); the bound versions,
        even if their names were replaced since."""
        if seq.leases or not seq.bound:
            return True
        try:
            for version, _ in seq.bound:
                seq.leases.append(self.registry.acquire(version))
        except AdapterCapacityError:
            self._release(seq)
            return False
        except AdapterError:
            self._release(seq)
            raise
        return True

    def _release(self, seq: Sequence) -> None:
        for lease in seq.leases:
            self.registry.release(lease)
        seq.leases.clear()
