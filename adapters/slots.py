"""LoraSlots: the per-slot A/B buffers, merge and gather dispatch that every LoRA layer shares."""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterable

import torch
from torch import nn

from .batch import LoraBatch
from .errors import InvalidAdapterError
from .factor_values import slot_values
from .peft_format import LoraWeights


class LoraState:
    """Shared by every LoRA layer of one model: the step's gather batch, or None for no gather, and
    a count of buffer allocations: which buffers exist decides which ops a forward runs, so a
    captured CUDA graph is stale once it moves (decode_graphs.py)."""

    def __init__(self):
        self.batch: LoraBatch | None = None
        self.layout_version = 0
        self.weights_version = 0  # counts merges and unmerges: the compiled CPU step's inputs follow it
        self.slots_version = 0  # counts slot loads and clears: the compiled step's LoRA rows follow it


class LoraSlots(nn.Module):
    """A base layer W0 plus `num_slots` adapter slots, applied per row (gather) or merged into W0.

    lora_a is [S, R, in] (`is_a_transposed`: [S, in, R]) and lora_b [S, R, out], allocated on the
    first load, zero past each slot's rank, scale folded into B; slot_ranks[s] is that rank (0: the
    adapter in s does not target this layer). Loading an adapter is a `copy_` into its slot.
    W0 is never written: a merge fills a separate buffer, so going back to base is a pointer change
    and after any number of swaps W0 is bit-identical to what was loaded.

    A subclass supplies the base op (`_base_forward`), the per-row delta (`add_delta`), W0
    (`base_weight`) and, where it has them, per-slot extras and merge steps (the hooks below).
    """

    is_a_transposed = False  # True: A is kept [S, in, R], so a row of Aᵀ is one contiguous lookup
    weight_is_in_out = False  # True: W0 is [in, out] (Conv1D, an embedding table), not Linear's [out, in]

    def __init__(
        self, state: LoraState, num_slots: int, max_rank: int, in_features: int, out_features: int, weight: torch.Tensor
    ):
        super().__init__()
        self.state, self.num_slots, self.max_rank = state, num_slots, max_rank
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = tuple(weight.shape)
        self.dtype, self.device = weight.dtype, weight.device
        self.lora_a: torch.Tensor | None = None  # [S, R, in] or [S, in, R], allocated on first use
        self.lora_b: torch.Tensor | None = None  # [S, R, out], scale folded in
        self.slot_ranks = [0] * num_slots
        self.rank_table: torch.Tensor | None = None  # [S] int32: slot_ranks on the device, for the row kernels
        self.merged_weight: torch.Tensor | None = None  # W0 + delta while merged, else None
        self._merge_buffer: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._base_forward(x)
        batch = self.state.batch
        if batch is None or self.lora_a is None:
            return y
        return self.add_delta(y, x, batch)

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, batch: LoraBatch) -> torch.Tensor:
        """Each row's own adapter delta added to `y` in place (the batched-gather op)."""
        raise NotImplementedError

    def base_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def slot_a(self, slot: int, rank: int) -> torch.Tensor:
        """The first `rank` rows of `slot`'s A as [r, in]: a view into lora_a, whatever its layout."""
        return self.lora_a[slot, :, :rank].T if self.is_a_transposed else self.lora_a[slot, :rank]

    @torch.no_grad()
    def set_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """Copy an adapter's A ([r, in]) and B ([r, out]) into `slot` (zero-padded to max rank), or
        clear it (None). Rows past a slot's rank are always zero, so only the rows that change are
        written: a rank-r load writes r rows and zeroes what the slot's previous rank leaves over
        (zeroing whole max-rank slots first wrote 2.7x the bytes of a rank-24 adapter)."""
        rank = 0 if weights is None else weights.a.shape[0]
        self._write_rows(slot, weights, rank)
        self._set_rank(slot, rank)
        self._set_extras(slot, weights)

    def _write_rows(self, slot: int, weights: LoraWeights | None, rank: int) -> None:
        """`weights` into the first `rank` rows of `slot`, and zeros over the rows its previous rank
        (slot_ranks, not yet updated) leaves past the new one; the buffers are allocated at the first
        rank to write."""
        if rank and self.lora_a is None:
            self._allocate()
        if self.lora_a is None:
            return
        if rank:
            rows_a, rows_b = self._rows(slot, 0, rank)
            slot_values(weights.a, 1.0, self.dtype, out=rows_a)
            slot_values(weights.b, weights.scale, self.dtype, out=rows_b)  # B's scale folds in here
        if self.slot_ranks[slot] > rank:
            for rows in self._rows(slot, rank, self.slot_ranks[slot]):
                rows.zero_()

    def _rows(self, slot: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows start:stop of `slot`'s A ([r, in] whatever its layout) and B, as views."""
        return self.slot_a(slot, stop)[start:], self.lora_b[slot, start:stop]

    def _set_rank(self, slot: int, rank: int) -> None:
        # A layer no loaded slot targets launches nothing in a captured graph (ops.add_lora_rows);
        # the first slot to target it changes which ops the forward runs, so graphs are made again.
        if rank and not any(self.slot_ranks):
            self.state.layout_version += 1
        self.slot_ranks[slot] = rank
        if self.rank_table is not None:
            self.rank_table[slot] = rank

    def _allocate(self) -> None:
        self.state.layout_version += 1
        factory = dict(dtype=self.dtype, device=self.device)
        a_shape = (self.in_features, self.max_rank) if self.is_a_transposed else (self.max_rank, self.in_features)
        self.lora_a = unwritten_zeros((self.num_slots, *a_shape), **factory)
        self.lora_b = unwritten_zeros((self.num_slots, self.max_rank, self.out_features), **factory)
        self.rank_table = torch.zeros(self.num_slots, dtype=torch.int32, device=self.device)

    def _set_extras(self, slot: int, weights: LoraWeights | None) -> None:
        """Hold `slot`'s terms beyond B·A (bias, DoRA), or drop them (None); none by default."""

    @torch.no_grad()
    def merge(self, terms: list[tuple[int, float]]) -> None:
        """Use W0 + Σ scale·delta(slot) as the weight; slots that do not target this layer add
        nothing, and none at all means W0."""
        terms = [(slot, scale) for slot, scale in terms if self.slot_ranks[slot]]
        if not terms:
            self.unmerge()
            return
        if self._merge_buffer is None:
            self._merge_buffer = torch.empty(self.weight_shape, dtype=self.dtype, device=self.device)
        merged = self._merge_buffer
        # The first term reads W0, the others add to the buffer in place.
        source = self._merge_source(merged)
        for slot, scale in terms:
            rank = self.slot_ranks[slot]
            a, b = self.slot_a(slot, rank), self.lora_b[slot, :rank]  # [r, in], [r, out]
            if self.weight_is_in_out:
                torch.addmm(source, a.T, b, alpha=scale, out=merged)  # [in, out]
            else:
                torch.addmm(source, b.T, a, alpha=scale, out=merged)  # [out, in]
            source = merged
        self._finish_merge(merged, terms)
        # Adapters are checked finite at load; only fp16's small range can overflow in the sum,
        # and re-reading every merged weight would cost as much as the merge itself.
        if self.dtype == torch.float16 and not torch.isfinite(merged).all():
            self.unmerge()
            raise InvalidAdapterError("merging would overflow this dtype (non-finite weights)")
        self._use_merged(merged)

    def targets(self, terms: Iterable[tuple[int, float]]) -> bool:
        """Whether a merge of `terms` writes this layer (some slot of it targets the layer)."""
        return any(self.slot_ranks[slot] for slot, _ in terms)

    @property
    def weight_bytes(self) -> int:
        """The size of W0 in the model's dtype: what a merge buffer for this layer takes."""
        return math.prod(self.weight_shape) * self.dtype.itemsize

    @property
    def merge_buffer_bytes(self) -> int:
        return 0 if self._merge_buffer is None else self.weight_bytes

    def release_merge_buffer(self) -> None:
        """Give the merge buffer's memory back (only while unmerged: the merged weight lives there)."""
        assert self.merged_weight is None or self.merged_weight is not self._merge_buffer
        self._merge_buffer = None

    def _merge_source(self, buffer: torch.Tensor) -> torch.Tensor:
        """W0 as the first merge term reads it (a subclass may write it into `buffer`)."""
        return self.base_weight()

    def _finish_merge(self, merged: torch.Tensor, terms: list[tuple[int, float]]) -> None:
        """What a merge adds after the deltas, before the finiteness check; nothing by default."""

    def _use_merged(self, merged: torch.Tensor) -> None:
        """Run on `merged` from now on (until `unmerge`)."""
        self.merged_weight = merged
        self.state.weights_version += 1

    def unmerge(self) -> None:
        """Back to W0: no arithmetic, W0 was never written."""
        self.merged_weight = None
        self.state.weights_version += 1


def unwritten_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros for slot buffers. On the CPU they are an anonymous mapping, whose pages the kernel
    maps on first write: torch.zeros memsets the whole buffer (~100 ms and ~300 MB resident for
    the default model's four rank-64 slots, on the first adapter ever loaded), while a slot's rows
    past its rank are never written and so cost neither time nor memory."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    pages = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=dtype, count=count).view(shape)  # the tensor keeps `pages` alive
