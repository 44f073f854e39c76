"""The compiled one-row decode step's LoRA inputs (compiled_step.py): one adapter's A and B rows for
every linear of the graph, so a stream on an adapter that is not merged (its first steps, or all of a
request too short to repay a merge) runs compiled too, not through the eager gather (~3 ops a linear:
43 against 28 ms a step on the default model with a rank-24 adapter, Intel Xeon, 2 cores).

Each linear gets its slot's A rows [P, in] and B rows [P, out] (scale folded into B), P the adapter's
rank rounded up to RANK_STEP: rows past a layer's own rank are zero in every slot (LoraSlots), so the
padding adds nothing but reads. P is a symbol of the graph (one graph for every rank), and rounding
keeps it off 0 and 1, the sizes a graph specializes on. A linear no adapter has targeted yet gets
zero rows of a shared buffer, so the graph's inputs are alike whichever layers an adapter targets:
no adapter recompiles it.

Served: a slot whose adapter changes these linears only, without LoRA biases or DoRA, full module
copies, or embedding, head or expert LoRA. Other slots run the eager gather.
"""

from __future__ import annotations

import torch

from adapters.layer import LoraLinear
from adapters.model import LoraModel

RANK_STEP = 8
MAX_ROWS = 4096  # the graph sums over P: longer float sums go in chunks, and the traced graph guards on that
Rows = tuple[list[torch.Tensor], list[torch.Tensor]]  # (A rows [P, in], B rows [P, out]) per linear


class CompiledLora:
    """A slot's LoRA inputs for the compiled step's linears, in the graph's order (the head excluded)."""

    def __init__(self, lora_model: LoraModel, linears: list[LoraLinear]):
        self.lora_model, self.linears = lora_model, linears
        own = {id(m) for m in linears}
        self.others = [m for m in lora_model.layers.values() if id(m) not in own] + list(lora_model.params.values())
        self._zeros: dict[tuple[int, torch.dtype], torch.Tensor] = {}  # [max rank, features] of zeros
        self._last: tuple = (None, None)  # (slot and the versions it was read at, its rows or None)

    def rows(self, slot: int) -> Rows | None:
        """`slot`'s rows for every linear, or None where the compiled step cannot serve its adapter.
        Read again only once a slot was loaded or the buffers' layout changed."""
        state = self.lora_model.state
        key = (slot, state.slots_version, state.layout_version)
        if self._last[0] != key:
            rows = self._views(slot, self.padded(self.lora_model.slot_ranks[slot])) if self.serves(slot) else None
            self._last = (key, rows)
        return self._last[1]

    def warm_rows(self) -> Rows:
        """Zero rows of the smallest padded rank, for the warm-up that compiles the graph."""
        return self._views(None, self.padded(1))

    def serves(self, slot: int) -> bool:
        model = self.lora_model
        if self.padded(model.slot_ranks[slot]) > MAX_ROWS:
            return False
        if slot in model.dora_slots or slot in model.copy_slots or any(m.slot_ranks[slot] for m in self.others):
            return False
        return all(m.extras is None and not m.is_a_transposed for m in self.linears)

    def padded(self, rank: int) -> int:
        return min(self.lora_model.max_rank, -(-max(rank, 1) // RANK_STEP) * RANK_STEP)

    def _views(self, slot: int | None, num_rows: int) -> Rows:
        a_rows, b_rows = [], []
        for m in self.linears:
            if slot is None or m.lora_a is None:
                a_rows.append(self._zero(m.in_features, m.dtype)[:num_rows])
                b_rows.append(self._zero(m.out_features, m.dtype)[:num_rows])
            else:
                a_rows.append(m.lora_a[slot, :num_rows])
                b_rows.append(m.lora_b[slot, :num_rows])
        return a_rows, b_rows

    def _zero(self, features: int, dtype: torch.dtype) -> torch.Tensor:
        zeros = self._zeros.get((features, dtype))
        if zeros is None:
            with torch.inference_mode(False):  # a normal tensor, as the slot buffers are: the same guards
                zeros = self._zeros[features, dtype] = torch.zeros(self.lora_model.max_rank, features, dtype=dtype)
        return zeros


def lora_signature(rows: Rows) -> tuple:
    """What the graph's guards check of the rows besides P (a symbol): strides, dtypes, and whether
    each is an inference tensor (its dispatch keys)."""
    return tuple((t.stride(), t.dtype, t.is_inference()) for part in rows for t in part)
