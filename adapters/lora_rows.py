"""A step's rows sorted by adapter slot, and the row blocks the LoRA kernels' programs take
(adapters/lora_kernels.py). Plain torch on the device, no host sync: a captured CUDA graph
re-sorts them on each replay."""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_M = 16  # rows per program: tl.dot's smallest tile


@dataclass(frozen=True)
class LoraRows:
    """A step's rows sorted by adapter slot, per term, as device tensors of fixed shape, and the
    row blocks the kernels' programs take: each block is up to BLOCK_M rows of one slot, so its A or
    B tile is shared by the block. The kernels' grids are sized by the rows (`row_blocks`, the blocks
    N rows fill when they share a slot) and each program loops over the blocks actually used
    (`blocks_used`, on the device), so no grid grows with the slots."""

    token_slots: torch.Tensor  # [K, N] int32: each row's slot in term k, -1 (BASE_SLOT) for none
    token_scales: torch.Tensor  # [K, N] float32
    sorted_rows: torch.Tensor  # [K, N] int32: per term, the rows stable-sorted by slot (base rows first)
    slot_starts: torch.Tensor  # [K, S + 1] int32: slot s's rows are sorted_rows[k, starts[s] : starts[s + 1]]
    block_slots: torch.Tensor  # [K, B] int32: each block's slot; -1 past the term's last block
    block_firsts: torch.Tensor  # [K, B] int32: each block's first position in sorted_rows
    blocks_used: torch.Tensor  # [K] int32: the blocks each term's adapter rows fill
    split_counts: torch.Tensor  # [K, B] int32: split-K programs done per block; zero between launches
    slot_list: tuple[int, ...] | None = None  # the slots in the step, on the host; None: any slot (a graph)

    @classmethod
    def build(
        cls,
        token_slots: torch.Tensor,
        token_scales: torch.Tensor | None,
        num_slots: int,
        slot_list: tuple[int, ...] | None = None,
    ) -> LoraRows:
        """From [K, N] (or [N]) slots and scales (None: all 1); torch ops only, no host sync."""
        slots = token_slots.reshape(-1, token_slots.shape[-1]).to(torch.int32)
        scales = torch.ones(slots.shape, dtype=torch.float32, device=slots.device)
        if token_scales is not None:
            scales.copy_(token_scales.reshape(slots.shape))
        sorted_rows, slot_starts, block_slots, block_firsts, used = _sort(slots, num_slots)
        counts = torch.zeros(block_slots.shape, dtype=torch.int32, device=slots.device)
        return cls(slots.clone(), scales, sorted_rows, slot_starts, block_slots, block_firsts, used, counts, slot_list)

    def fill_(self, token_slots: torch.Tensor, token_scales: torch.Tensor | None) -> None:
        """Recompute into these tensors (the static buffers a captured graph reads)."""
        self.token_slots.copy_(token_slots.reshape(self.token_slots.shape))
        if token_scales is None:
            self.token_scales.fill_(1.0)
        else:
            self.token_scales.copy_(token_scales.reshape(self.token_scales.shape))
        for mine, new in zip(
            (self.sorted_rows, self.slot_starts, self.block_slots, self.block_firsts, self.blocks_used),
            _sort(self.token_slots, self.num_slots),
        ):
            mine.copy_(new)

    @property
    def num_terms(self) -> int:
        return self.token_slots.shape[0]

    @property
    def num_slots(self) -> int:
        return self.slot_starts.shape[1] - 1

    @property
    def num_blocks(self) -> int:
        """The block table's capacity: the most blocks the rows can fill."""
        return self.block_slots.shape[1]

    @property
    def row_blocks(self) -> int:
        """The blocks N rows fill when they share one slot: what the kernels' grids are sized by."""
        return -(-self.token_slots.shape[1] // BLOCK_M)


def max_blocks(num_rows: int, num_slots: int) -> int:
    """The most BLOCK_M blocks N rows can take when each block holds one slot's rows: d slots in use
    take at most (N + d·(BLOCK_M - 1)) // BLOCK_M, largest at d = min(N, S)."""
    used = min(num_rows, num_slots)
    return max(1, (num_rows + used * (BLOCK_M - 1)) // BLOCK_M)


def _sort(slots: torch.Tensor, num_slots: int) -> tuple[torch.Tensor, ...]:
    """Rows sorted by slot, where each slot's run starts (a searchsorted over the sorted slots:
    bincount would size its output from the data, a host sync), and the block table."""
    sorted_slots, order = torch.sort(slots.long(), dim=1, stable=True)
    bounds = torch.arange(num_slots + 1, device=slots.device).expand(slots.shape[0], -1).contiguous()
    starts = torch.searchsorted(sorted_slots, bounds)  # first position whose slot >= s; base rows (-1) sort first
    blocks_per_slot = (starts[:, 1:] - starts[:, :-1] + BLOCK_M - 1) // BLOCK_M  # [K, S]
    block_ends = blocks_per_slot.cumsum(1)  # [K, S]: one past each slot's last block
    block = torch.arange(max_blocks(slots.shape[1], num_slots), device=slots.device)
    block = block.expand(slots.shape[0], -1).contiguous()  # [K, B]
    block_slot = torch.searchsorted(block_ends, block, right=True)  # S past the term's last block
    owner = block_slot.clamp(max=num_slots - 1)
    first_block = (block_ends - blocks_per_slot).gather(1, owner)
    firsts = starts.gather(1, owner) + (block - first_block) * BLOCK_M
    block_slot = torch.where(block_slot < num_slots, block_slot, -1)
    used = block_ends[:, -1].to(torch.int32)
    return order.to(torch.int32), starts.to(torch.int32), block_slot.to(torch.int32), firsts.to(torch.int32), used
