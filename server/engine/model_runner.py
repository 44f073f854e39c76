"""Packs a step's sequences into one forward pass of the stock model and returns logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters import BASE_SLOT, LoraModel, SlotMix

from .attention import ATTENTION_NAME, KVStep, SeqSlice, step_context
from .compiled_lora import Rows
from .compiled_step import compiled_decode, measure_again_when_quiet
from .decode_graphs import DecodeGraphs
from .kv_cache import KVCache
from .lean_forward import lean_forward
from .sequence import Sequence


@dataclass
class PromptRows:
    """Logits of the prompt positions one request scores this step (SamplingParams.prompt_logprobs)."""

    seq: Sequence
    targets: range  # prompt token indices these rows predict: row k predicts targets[k]
    logits: torch.Tensor  # [len(targets), V]


class ModelRunner:
    """All sequences of a step go in as one packed row: [1, N] tokens, per-token positions."""

    def __init__(
        self,
        lora_model: LoraModel,
        cache: KVCache,
        *,
        row_kernels: bool = False,
        decode_graphs: bool = False,
        max_rows: int = 1,
        max_positions: int | None = None,
        compile_decode: str = "off",
        cache_dir: Path | None = None,
    ):
        """`row_kernels`: attention and LoRA linears run the Triton row kernels (CUDA's default);
        `decode_graphs`: decode steps of up to `max_rows` rows go through DecodeGraphs (needs them);
        `max_positions`: the served context length (the CUDA pass's rope table; None: the model's);
        `compile_decode` (on, off, auto: if measured faster here): decode steps on base or merged
        weights run one torch.compile'd forward (compiled_step.py, CPU), its code cached in `cache_dir`."""
        self.lora_model, self.cache, self.row_kernels = lora_model, cache, row_kernels
        lora_model.row_kernels = row_kernels
        self.model = lora_model.model
        self.model.set_attn_implementation(ATTENTION_NAME)
        self.device = lora_model.device
        self.lean = None
        if row_kernels:  # the CUDA pass, of few kernels per layer, where the family has one
            from .cuda_forward import cuda_forward  # Triton: imported only where rows are used

            self.lean = cuda_forward(self.model, max_positions or self.model.config.max_position_embeddings)
        self.lean = self.lean or lean_forward(self.model)  # None: this family runs the stock forward
        self.graphs = None
        if decode_graphs and self.lean is not None:
            self.graphs = DecodeGraphs(self.lean, lora_model, cache, max_rows, max_terms=lora_model.max_loras)
        self.compiled = compiled_decode(self.lean, cache, compile_decode, cache_dir or Path("."), lora_model)

    @torch.inference_mode()
    def run(
        self, scheduled: list[tuple[Sequence, int]], gather: bool
    ) -> tuple[torch.Tensor, list[Sequence], list[PromptRows]]:
        """Forward the step; returns logits [M, V] for the M sequences that now sample a token, and
        the prompt rows of the sequences that score their prompt (none unless a request asks)."""
        if self.graphs is not None and self.graphs.can_run(scheduled):
            seqs = [seq for seq, _ in scheduled]
            return self.graphs.run(seqs), seqs, []
        ids, positions, write, mixes, keep, prompt_keep = [], [], [], [], [], []
        seq_slices, sampling, scored, row_starts = [], [], [], []
        # Rows of one adapter side by side (the base first): the LoRA op then takes them as one view,
        # not a gather.
        for seq, num_new in sorted(scheduled, key=lambda item: item[0].slot_mix):
            first, row = seq.num_computed, len(ids)
            kv_start = self.cache.start(seq.seq_id)
            ids += seq.all_token_ids[first : first + num_new]
            positions += range(first, first + num_new)
            write += range(kv_start + first, kv_start + first + num_new)
            mixes.append((seq.slot_mix, num_new))
            row_starts += [kv_start] * num_new
            seq_slices.append(SeqSlice(row, num_new, kv_start, first + num_new))
            if first + num_new == seq.num_tokens and seq.max_tokens:  # this row yields the next token
                keep.append(row + num_new - 1)
                sampling.append(seq)
            if seq.params.prompt_logprobs is not None and len(seq.prompt_logprobs) < len(seq.prompt_token_ids):
                targets = _unscored_targets(seq, first, num_new)
                scored.append((seq, targets))
                prompt_keep += range(row + targets.start - 1 - first, row + targets.stop - 1 - first)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        row_kv = None
        if self.row_kernels:  # each row's keys: its sequence's extent up to and including itself
            as_int32 = lambda values: torch.tensor(values, dtype=torch.int32, device=self.device)  # noqa: E731
            row_kv = (as_int32(row_starts), as_int32(positions) + 1)
        step = KVStep(self.cache, seq_slices, as_tensor(write), row_kv)
        head_rows = as_tensor(keep + prompt_keep)
        # Only the kept rows reach the head: its LoRA must follow them (LoraBatch.head).
        head_keep = head_rows if self.lora_model.has_head_lora else None
        batch, lora = None, None
        contexts = (min(positions) + 1, max(positions) + 1)  # keys the rows see, their own included
        if gather:
            lora = self._compiled_lora(scheduled, len(ids), contexts)
        if gather and lora is None:
            token_slots, token_scales = _lora_rows(mixes, any(seq.adapter.is_composition for seq, _ in scheduled))
            batch = self.lora_model.build_batch(token_slots, token_scales=token_scales, keep=head_keep)
        is_decode = batch is None and len(ids) == len(scheduled)  # one new token per sequence
        with self.lora_model.gather(batch):
            logits = self._forward(as_tensor(ids), as_tensor(positions), head_rows, step, is_decode, lora, contexts)
        return logits[: len(keep)], sampling, _split(logits[len(keep) :], scored)  # logits: [M + scored, V]

    def gathers_faster(self, scheduled: list[tuple[Sequence, int]]) -> bool:
        """Whether this step, of one sequence on one adapter, and its one-row decode steps after it
        run faster unmerged (the compiled LoRA graph on an int8 base: compiled_step.py); the mode
        policy then does not merge it."""
        if self.compiled is None or len(scheduled) != 1:
            return False
        mix = scheduled[0][0].slot_mix
        return len(mix) == 1 and mix[0][1] == 1.0 and self.compiled.gathers_faster(mix[0][0])

    def idle(self, interrupted: Callable[[], bool]) -> None:
        """While the engine has nothing to run: settle a compiled-step verdict measured under load."""
        measure_again_when_quiet(self.compiled, interrupted)

    def _compiled_lora(
        self, scheduled: list[tuple[Sequence, int]], num_rows: int, contexts: tuple[int, int]
    ) -> Rows | None:
        """The compiled step's LoRA rows for a step of one row on one adapter (at scale 1) that it
        serves (compiled_lora.py); None: the step gathers eagerly."""
        if self.compiled is None or len(scheduled) != 1 or num_rows != 1 or not self.compiled.can_run(1, contexts):
            return None
        mix = scheduled[0][0].slot_mix
        return self.compiled.lora_rows(mix[0][0]) if len(mix) == 1 and mix[0][1] == 1.0 else None

    def _forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        step: KVStep,
        is_decode: bool = False,
        lora: Rows | None = None,
        contexts: tuple[int, int] = (0, 0),
    ) -> torch.Tensor:
        if is_decode and self.compiled is not None and self.compiled.can_run(len(ids), contexts):
            return self.compiled(ids, positions, rows, step, lora)
        assert lora is None, "LoRA rows are the compiled step's inputs"
        if self.lean is not None:
            return self.lean(ids, positions, rows, step)
        with step_context(step):
            out = self.model(input_ids=ids[None], position_ids=positions[None], use_cache=False, logits_to_keep=rows)
        return out.logits[0]


def _lora_rows(mixes: list[tuple[SlotMix, int]], has_composed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's rows for LoraBatch from each sequence's (mix, number of rows): [N] slots when every
    row has one adapter or none (the plain path), else [K, N] slots and scales, one line per term."""
    if not has_composed:
        slots = []
        for mix, num_rows in mixes:
            slots += [mix[0][0] if mix else BASE_SLOT] * num_rows
        return torch.tensor(slots), None
    num_tokens, depth = sum(num_rows for _, num_rows in mixes), max(len(mix) for mix, _ in mixes)
    token_slots, token_scales = torch.full((depth, num_tokens), BASE_SLOT), torch.ones(depth, num_tokens)
    row = 0
    for mix, num_rows in mixes:
        for k, (slot, scale) in enumerate(mix):
            token_slots[k, row : row + num_rows], token_scales[k, row : row + num_rows] = slot, scale
        row += num_rows
    return token_slots, token_scales


def _unscored_targets(seq: Sequence, first: int, num_new: int) -> range:
    """Prompt tokens this chunk's rows predict that are not scored yet: position p predicts token
    p + 1, and a recompute after preemption skips what was scored before it."""
    start = max(first + 1, len(seq.prompt_logprobs))
    return range(start, max(start, min(first + num_new + 1, len(seq.prompt_token_ids))))


def _split(logits: torch.Tensor, scored: list[tuple[Sequence, range]]) -> list[PromptRows]:
    rows, start = [], 0
    for seq, targets in scored:
        rows.append(PromptRows(seq, targets, logits[start : start + len(targets)]))
        start += len(targets)
    return rows
