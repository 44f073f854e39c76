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
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_DIRECT_RUNS = 8
MIN_RUN_ROWS = 16

BASE_SLOT = -1  # the slot of rows that use no adapter: the base model alone


@dataclass(frozen=True)
class Run:
    """Rows [start, stop) of the packed step all use `slot`."""

    slot: int
    start: int
    stop: int


@dataclass(frozen=True)
class Groups:
    """Rows grouped by adapter slot, padded to the largest group.

    Padded entries point at a real row of their group and are zeroed by `pad_mask`.
    """

    rows: torch.Tensor  # [k * L] long: flat token indices, group after group
    slots: torch.Tensor  # [k] long: the device slot of each group
    slot_list: list[int]  # the same on the host, to pick each layer's rank without a sync
    pad_mask: torch.Tensor | None  # [k, L, 1]: 1 for real rows, 0 for padding; None if no padding
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

    @classmethod
    def build(cls, token_slots: torch.Tensor, device: torch.device | str = "cpu",
              max_direct_runs: int = MAX_DIRECT_RUNS, min_run_rows: int = MIN_RUN_ROWS) -> "LoraBatch | None":
        """Split the step's rows into runs and groups; `token_slots` is [N] with BASE_SLOT for base rows.

        Returns None when every row is base: then the LoRA layers do no extra work at all.
        """
        token_slots = token_slots.to("cpu", torch.long)
        if not bool((token_slots >= 0).any()):
            return None
        runs = _runs(token_slots)
        if len(runs) > max_direct_runs:
            runs = [run for run in runs if run.stop - run.start >= min_run_rows]
        grouped = token_slots.clone()
        for run in runs:
            grouped[run.start:run.stop] = -1
        groups = _group(grouped, device) if bool((grouped >= 0).any()) else None
        return cls(runs=runs, groups=groups, num_tokens=token_slots.numel())


def _runs(token_slots: torch.Tensor) -> list[Run]:
    """Every maximal stretch of one adapter slot."""
    values, counts = torch.unique_consecutive(token_slots, return_counts=True)
    stops = torch.cumsum(counts, 0)
    return [Run(slot, stop - count, stop)
            for slot, count, stop in zip(values.tolist(), counts.tolist(), stops.tolist()) if slot >= 0]


def _group(token_slots: torch.Tensor, device) -> Groups:
    order = torch.argsort(token_slots, stable=True)
    order = order[token_slots[order] >= 0]  # base rows need no LoRA work
    slots, counts = torch.unique_consecutive(token_slots[order], return_counts=True)
    num_groups, group_len = slots.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts  # [k]
    group = torch.repeat_interleave(torch.arange(num_groups), counts)  # [n]
    position = torch.arange(order.numel()) - starts[group]  # [n]
    rows = order[starts].unsqueeze(1).repeat(1, group_len)  # [k, L], padded with each group's first row
    rows[group, position] = order
    pad_mask = None
    if bool((counts != group_len).any()):
        pad_mask = torch.zeros(num_groups, group_len, 1)
        pad_mask[group, position] = 1.0
        pad_mask = pad_mask.to(device)
    slot_list = slots.tolist()
    return Groups(rows=rows.view(-1).to(device), slots=slots.to(device), slot_list=slot_list,
                  pad_mask=pad_mask, group_len=group_len,
                  slots_are_prefix=slot_list == list(range(num_groups)))
