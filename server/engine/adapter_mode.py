"""Per-step choice between merged and gathered LoRA, with hysteresis so swaps do not thrash."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from adapters import BASE_MIX, InvalidAdapterError, LoraModel, MergeBudgetError, SlotMix

log = logging.getLogger(__name__)

BASE, MERGED, GATHER = "base", "merged", "gather"


@dataclass
class ModeDecision:
    mode: str  # BASE, MERGED or GATHER
    swap_seconds: float | None = None  # set when this step merged a new adapter


class ModePolicy:
    """Merged when one adapter has held every row for `merge_after_steps` steps in a row, and its
    rows may still run `merge_min_steps_left` steps.

    Unmerging is free (W0 is never written), so base-only and mixed steps simply unmerge; only
    merging costs, and the streak bounds how often that happens. A merge costs many gathered steps:
    on the default model in fp32 with a rank-24 adapter on all seven projections, the merge and the
    repack of the merged weights for the packed kernels made that step ~320 ms longer than a gathered
    one, while a gathered step costs ~12 ms more than a merged one (AMD EPYC, 2 cores): it pays back
    after ~27 steps, hence 32. Rows that cannot run that long are served gathered throughout (a
    4-token request on a loaded adapter reached its first token in 0.26 s when it merged at its
    prefill, against ~0.1 s gathered).
    """

    def __init__(self, lora_model: LoraModel, merge_after_steps: int, merge_min_steps_left: int):
        self.lora_model, self.merge_after_steps = lora_model, merge_after_steps
        self.merge_min_steps_left = merge_min_steps_left
        self._candidate: SlotMix | None = None
        self._streak = 0
        self._unmergeable: set[SlotMix] = set()  # mixes whose merge was not finite: they stay gathered

    def choose(self, mixes: set[SlotMix], steps_left: int, gathers_faster: bool = False) -> ModeDecision:
        """The mode of a step whose rows use `mixes` and may run `steps_left` more steps (this one
        included); merges (or unmerges) the weights to match. `gathers_faster`: the runner serves
        this step faster unmerged (ModelRunner.gathers_faster), so it does not merge."""
        model = self.lora_model
        if len(mixes) != 1 or BASE_MIX in mixes:
            self._candidate, self._streak = None, 0
            if model.merged is not None:
                model.unmerge()
            return ModeDecision(BASE if mixes <= {BASE_MIX} else GATHER)
        (mix,) = mixes
        if model.merged == mix:
            return ModeDecision(MERGED)
        if model.merge_budget == 0:  # merges are off (--merge-memory 0, or captured decode graphs)
            return ModeDecision(GATHER)
        self._streak = self._streak + 1 if self._candidate == mix else 1
        self._candidate = mix
        if (
            self._streak < self.merge_after_steps
            or steps_left < self.merge_min_steps_left
            or mix in self._unmergeable
            or gathers_faster
        ):
            if model.merged is not None:
                model.unmerge()
            return ModeDecision(GATHER)
        started = time.perf_counter()
        try:
            model.merge(mix)
        except (InvalidAdapterError, MergeBudgetError) as exc:  # W0 + ΔW overflows the dtype, or the
            # buffers would pass --merge-memory: those rows' problem, not the step's
            log.warning("serving %s gathered: %s", mix, exc)
            self._unmergeable = self._unmergeable if len(self._unmergeable) < 64 else set()
            self._unmergeable.add(mix)
            return ModeDecision(GATHER)
        return ModeDecision(MERGED, swap_seconds=time.perf_counter() - started)
