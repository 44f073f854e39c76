"""Per-step LoRA metadata: which token rows use which device slot.

Built once per step on the host and read by every LoRA layer, so layer forwards keep
their stock signatures (nano-vllm's context object).

Rows reach the LoRA op in one of two shapes, chosen here once per step:
- runs: stretches of consecutive rows on one adapter (a prompt chunk; the decode rows the runner
  packs side by side). Each is a view of x and y, so it costs two exact-size matmuls at that
  adapter's own rank, with no gather, no scatter and no padding.
- groups: every other adapter row, grouped by slot and padded to the largest group, so one
  `bmm` serves all adapters at once whatever their number.
Calls, not flops, dominate small CPU steps: two matmuls per run beat the grouped bmm's five
ops up to about 8 runs (measured on a 4- to 16-adapter decode step), so a step with at most
MAX_DIRECT_RUNS runs takes them all directly; past that only runs of MIN_RUN_ROWS rows do.

Composed rows (several adapters with scales on one row: h = W0·x + Σ scaleᵢ·Bᵢ·Aᵢ·x) are more terms
on the same rows: `token_slots` [K, N] gives each row's k-th adapter (BASE_SLOT past its last) and
`token_scales` [K, N] its scale. Each term is one more run or group entry over the same slot
buffers, scaled in the matmul, so a composition never copies weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .lora_kernels import LoraRows

# add_lora_stacked serves steps of at most STACK_MAX_ROWS rows whose slots' ranks in the layer sum to
# at most STACK_MAX_COLUMNS: past those the flops it wastes on other slots' columns outgrow the calls
# it saves, and its stacked copies (Σr x (in + out) a layer) the memory worth spending.
STACK_MAX_ROWS = 64
STACK_MAX_COLUMNS = 64

MAX_DIRECT_RUNS = 8
MIN_RUN_ROWS = 16

BASE_SLOT = -1  # the slot of rows that use no adapter: the base model alone


@dataclass(frozen=True)
class Run:
    """Rows [start, stop) of the packed step all use `slot`, its delta multiplied by `scale`."""

    slot: int
    start: int
    stop: int
    scale: float = 1.0


@dataclass(frozen=True)
class Groups:
    """Rows grouped by adapter slot, padded to the largest group.

    Padded entries point at a real row of their group and are zeroed by `pad_mask`.
    """

    rows: torch.Tensor  # [k * L] long: flat token indices, group after group
    slots: torch.Tensor  # [k] long: the device slot of each group
    slot_list: list[int]  # the same on the host, to pick each layer's rank without a sync
    pad_mask: torch.Tensor | None  # [k, L, 1]: each row's scale (1 unless composed), 0 for padding;
    # None when every entry is a real row at scale 1
    group_len: int  # L: rows in the largest group
    slots_are_prefix: bool  # slots == [0, 1, ..., k-1]: weights can be sliced, not gathered

    @property
    def num_groups(self) -> int:
        return len(self.slot_list)


@dataclass(frozen=True)
class LoraBatch:
    """A step's adapter rows as direct runs plus (optionally) one padded group set."""

    runs: list[Run]
    groups: Groups | None
    num_tokens: int  # N: all token rows in the step, base rows included
    head: LoraBatch | None = field(default=None)  # the rows that reach the output head, if not all N
    rows: LoraRows | None = field(default=None)  # the same rows sorted by slot on the device, for the
    # row kernels (CUDA): LoRA linears use them instead of runs and groups (which embeddings and
    # per-row module copies still read)
    token_slots: torch.Tensor | None = field(default=None)  # [N] or [K, N] long on the host: the slots
    # as given, for ops that regroup rows by more than their adapter (MoE experts: experts.py)
    token_scales: torch.Tensor | None = field(default=None)  # [K, N] float on the host, or None: all 1
    stack_masks: dict = field(default_factory=dict, compare=False, repr=False)  # stack_mask's, by layout
    stack_plans: dict = field(default_factory=dict, compare=False, repr=False)  # stack_plan's, by slot ranks

    @classmethod
    def build(
        cls,
        token_slots: torch.Tensor,
        device: torch.device | str = "cpu",
        max_direct_runs: int = MAX_DIRECT_RUNS,
        min_run_rows: int = MIN_RUN_ROWS,
        *,
        token_scales: torch.Tensor | None = None,
        direct_slots: frozenset[int] = frozenset(),
        keep: torch.Tensor | None = None,
    ) -> LoraBatch | None:
        """Split the step's rows into runs and groups; `token_slots` is [N] (or [K, N] with composed
        rows, `token_scales` the same shape) with BASE_SLOT for no adapter.

        `direct_slots` (DoRA adapters: their magnitude scales the row after its delta) always run
        directly. `keep` [M]: the rows that reach the output head, when not all of them do.
        Returns None when every row is base: then the LoRA layers do no extra work at all.
        """
        token_slots = token_slots.to("cpu", torch.long)
        if not bool((token_slots >= 0).any()):
            return None
        if token_slots.dim() == 1 and token_scales is None:
            batch = cls._build_terms([(token_slots, None)], device, max_direct_runs, min_run_rows, direct_slots)
        else:
            scales = torch.ones(token_slots.shape) if token_scales is None else token_scales.to("cpu", torch.float)
            terms = list(zip(token_slots.view(-1, token_slots.shape[-1]), scales.view(-1, token_slots.shape[-1])))
            batch = cls._build_terms(terms, device, max_direct_runs, min_run_rows, direct_slots)
        if keep is not None and batch is not None:
            keep = keep.to("cpu", torch.long)
            head_scales = None if token_scales is None else token_scales.to("cpu")[..., keep]
            head = cls.build(
                token_slots[..., keep],
                device,
                max_direct_runs,
                min_run_rows,
                token_scales=head_scales,
                direct_slots=direct_slots,
            )
            if head is None:  # no kept row uses an adapter: the head adds nothing, rather than all N rows' deltas
                head = cls(runs=[], groups=None, num_tokens=keep.numel())
            batch = cls(batch.runs, batch.groups, batch.num_tokens, head)
        if batch is not None:
            scales = None if token_scales is None else token_scales.to("cpu", torch.float)
            batch = replace(batch, token_slots=token_slots, token_scales=scales)
        return batch

    @classmethod
    def _build_terms(cls, terms, device, max_direct_runs, min_run_rows, direct_slots) -> LoraBatch:
        runs = [run for slots, scales in terms for run in _runs(slots, scales)]
        if len(runs) > max_direct_runs:
            runs = [run for run in runs if run.stop - run.start >= min_run_rows or run.slot in direct_slots]
        grouped = []
        for slots, scales in terms:
            slots = slots.clone()
            for run in runs:
                slots[run.start : run.stop] = -1
            grouped.append((slots, scales))
        groups = _group(grouped, device) if any(bool((slots >= 0).any()) for slots, _ in grouped) else None
        return cls(runs=runs, groups=groups, num_tokens=terms[0][0].numel())

    def stack_plan(
        self, slot_ranks: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> tuple[tuple[tuple[int, int], ...], torch.Tensor] | None:
        """(layout, mask) for a layer whose slots have `slot_ranks`, or None where stacking would not
        pay: fewer than two of the step's runs on slots the layer has, or their ranks past
        STACK_MAX_COLUMNS. Made once a step per ranks: the ~200 linears of a decode step share a few."""
        key = (slot_ranks, dtype, device)
        if key in self.stack_plans:
            return self.stack_plans[key]
        layout, num_runs = {}, 0
        for run in self.runs:
            if rank := slot_ranks[run.slot]:
                layout[run.slot], num_runs = rank, num_runs + 1
        plan = None
        if num_runs >= 2 and sum(layout.values()) <= STACK_MAX_COLUMNS:
            layout = tuple(layout.items())
            plan = layout, self.stack_mask(layout, dtype, device)
        self.stack_plans[key] = plan
        return plan

    def stack_mask(self, layout: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[N, Σ rank] for ops.add_lora_stacked: each run's scale on its rows under its slot's columns
        (`layout`: (slot, rank) per stacked slot, in column order), 0 elsewhere. Made once a step
        per layout: the layers that share one reuse it."""
        key = (layout, dtype, device)
        mask = self.stack_masks.get(key)
        if mask is None:
            columns, start = {}, 0
            for slot, rank in layout:
                columns[slot], start = slice(start, start + rank), start + rank
            mask = torch.zeros(self.num_tokens, start, dtype=dtype)
            for run in self.runs:
                if run.slot in columns:
                    mask[run.start : run.stop, columns[run.slot]] += run.scale
            mask = self.stack_masks[key] = mask.to(device)
        return mask

    @property
    def head_batch(self) -> LoraBatch:
        """The batch the output head applies: every row reaches it unless `keep` said otherwise."""
        return self if self.head is None else self.head


def with_rows(
    batch: LoraBatch,
    token_slots: torch.Tensor,
    token_scales: torch.Tensor | None,
    keep: torch.Tensor | None,
    num_slots: int,
    device: torch.device | str,
) -> LoraBatch:
    """`batch` with its rows (and its head's) sorted by slot on the device for the row kernels."""
    from .lora_kernels import LoraRows  # Triton: imported only where rows are used

    slots = token_slots.to(device, torch.int32).view(-1, token_slots.shape[-1])
    scales = None if token_scales is None else token_scales.to(device, torch.float32).view(slots.shape)
    # The step's slots, known here on the host: a layer none of them targets launches nothing.
    slot_list = {run.slot for run in batch.runs} | set(batch.groups.slot_list if batch.groups else ())
    slot_list = tuple(sorted(slot_list))
    head = batch.head
    if head is not None:  # the head's rows are a subset: the step's slots still bound them
        keep = keep.to(device)
        head_rows = LoraRows.build(slots[:, keep], None if scales is None else scales[:, keep], num_slots, slot_list)
        head = replace(head, rows=head_rows)
    return replace(batch, head=head, rows=LoraRows.build(slots, scales, num_slots, slot_list))


def _runs(token_slots: torch.Tensor, token_scales: torch.Tensor | None = None) -> list[Run]:
    """Every maximal stretch of one adapter slot (and one scale)."""
    if token_scales is None:
        values, counts = torch.unique_consecutive(token_slots, return_counts=True)
        stops = torch.cumsum(counts, 0)
        return [
            Run(slot, stop - count, stop)
            for slot, count, stop in zip(values.tolist(), counts.tolist(), stops.tolist())
            if slot >= 0
        ]
    change = torch.ones(token_slots.numel(), dtype=torch.bool)
    change[1:] = (token_slots[1:] != token_slots[:-1]) | (token_scales[1:] != token_scales[:-1])
    starts = change.nonzero().view(-1).tolist()
    stops = starts[1:] + [token_slots.numel()]
    slots, scales = token_slots.tolist(), token_scales.tolist()
    return [Run(slots[start], start, stop, scales[start]) for start, stop in zip(starts, stops) if slots[start] >= 0]


def _group(terms: list[tuple[torch.Tensor, torch.Tensor | None]], device) -> Groups:
    """Group the entries (row, slot, scale) of every term by slot; a composed row joins several groups."""
    if len(terms) == 1:
        token_slots, token_scales = terms[0]
        order = torch.argsort(token_slots, stable=True)
        order = order[token_slots[order] >= 0]  # base rows need no LoRA work
        entry_slots = token_slots[order]
        entry_scales = None if token_scales is None else token_scales[order]
    else:
        flat_slots = torch.cat([slots for slots, _ in terms])
        flat_scales = torch.cat([scales for _, scales in terms])
        entries = torch.argsort(flat_slots, stable=True)
        entries = entries[flat_slots[entries] >= 0]
        order, entry_slots, entry_scales = entries % terms[0][0].numel(), flat_slots[entries], flat_scales[entries]
    if entry_scales is not None and bool((entry_scales == 1).all()):
        entry_scales = None
    slots, counts = torch.unique_consecutive(entry_slots, return_counts=True)
    num_groups, group_len = slots.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts  # [k]
    group = torch.repeat_interleave(torch.arange(num_groups), counts)  # [n]
    position = torch.arange(order.numel()) - starts[group]  # [n]
    rows = order[starts].unsqueeze(1).repeat(1, group_len)  # [k, L], padded with each group's first row
    rows[group, position] = order
    pad_mask = None
    if entry_scales is not None or bool((counts != group_len).any()):
        pad_mask = torch.zeros(num_groups, group_len, 1)
        pad_mask[group, position, 0] = 1.0 if entry_scales is None else entry_scales
        pad_mask = pad_mask.to(device)
    slot_list = slots.tolist()
    return Groups(
        rows=rows.view(-1).to(device),
        slots=slots.to(device),
        slot_list=slot_list,
        pad_mask=pad_mask,
        group_len=group_len,
        slots_are_prefix=slot_list == list(range(num_groups)),
    )
