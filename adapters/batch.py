"""Per-step LoRA metadata: which token rows use which device slot, grouped by adapter.

Built once per step on the host and read by every LoRA layer, so layer forwards keep
their stock signatures (nano-vllm's context object).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraBatch:
    """Token rows grouped by adapter slot, padded to the largest group.

    Groups are padded to the same length so one `bmm` serves every adapter at once; padded
    entries point at a real row of their group and are zeroed by `pad_mask`.
    """

    rows: torch.Tensor  # [k * L] long: flat token indices, group after group
    slots: torch.Tensor  # [k] long: the device slot of each group
    pad_mask: torch.Tensor | None  # [k, L, 1]: 1 for real rows, 0 for padding; None if no padding
    num_groups: int  # k: distinct adapters in the step
    group_len: int  # L: rows in the largest group
    rank: int  # largest rank among the step's slots: the width the kernels compute
    slots_are_prefix: bool  # slots == [0, 1, ..., k-1]: weights can be sliced, not gathered
    num_tokens: int  # N: all token rows in the step, base rows included

    @classmethod
    def build(cls, token_slots: torch.Tensor, slot_ranks: list[int],
              device: torch.device | str = "cpu") -> "LoraBatch | None":
        """Group the step's tokens by slot; `token_slots` is [N] with -1 for base rows.

        Returns None when every row is base: then the LoRA layers do no extra work at all.
        """
        token_slots = token_slots.to("cpu", torch.long)
        order = torch.argsort(token_slots, stable=True)
        order = order[token_slots[order] >= 0]  # drop base rows: they need no LoRA work
        if order.numel() == 0:
            return None
        sorted_slots = token_slots[order]
        slots, counts = torch.unique_consecutive(sorted_slots, return_counts=True)
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
        return cls(rows=rows.view(-1).to(device), slots=slots.to(device), pad_mask=pad_mask,
                   num_groups=num_groups, group_len=group_len,
                   rank=max(slot_ranks[s] for s in slot_list),
                   slots_are_prefix=slot_list == list(range(num_groups)),
                   num_tokens=token_slots.numel())
