"""Packs a step's sequences into one forward pass of the stock model and returns logits."""
from __future__ import annotations

import torch

from adapters import LoraModel

from server.engine.attention import ATTENTION_NAME, KVStep, SeqSlice
from server.engine.kv_cache import KVCache
from server.engine.sequence import Sequence


class ModelRunner:
    """All sequences of a step go in as one packed row: [1, N] tokens, per-token positions."""

    def __init__(self, lora_model: LoraModel, cache: KVCache):
        self.lora_model, self.cache = lora_model, cache
        self.model = lora_model.model
        self.model.set_attn_implementation(ATTENTION_NAME)
        self.device = lora_model.device

    @torch.inference_mode()
    def run(self, scheduled: list[tuple[Sequence, int]], gather: bool) -> tuple[torch.Tensor, list[Sequence]]:
        """Forward the step; returns logits [M, V] for the M sequences that now sample a token."""
        ids, positions, write, slots, keep = [], [], [], [], []
        seq_slices, sampling = [], []
        # Rows of one adapter side by side: the LoRA op then takes them as one view, not a gather.
        for seq, num_new in sorted(scheduled, key=lambda item: item[0].slot):
            first, row = seq.num_computed, len(ids)
            kv_start = self.cache.start(seq.seq_id)
            ids += seq.all_token_ids[first:first + num_new]
            positions += range(first, first + num_new)
            write += range(kv_start + first, kv_start + first + num_new)
            slots += [seq.slot] * num_new
            seq_slices.append(SeqSlice(row, num_new, kv_start, first + num_new))
            if first + num_new == seq.num_tokens:  # prompt done: this row yields the next token
                keep.append(row + num_new - 1)
                sampling.append(seq)
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=self.device)  # noqa: E731
        step = KVStep(self.cache, seq_slices, as_tensor(write))
        batch = self.lora_model.build_batch(torch.tensor(slots)) if gather else None
        with self.lora_model.gather(batch):
            out = self.model(input_ids=as_tensor(ids)[None], position_ids=as_tensor(positions)[None],
                             use_cache=False, logits_to_keep=as_tensor(keep), kv_step=step)
        return out.logits[0], sampling  # [M, V]
