"""Incremental detokenization for streaming: whole characters only, stop strings never leaked."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 4  # prompt tokens decoded along with the output so leading spaces come out right


class IncrementalDetokenizer:
    """Turns output tokens into text deltas.

    Text is emitted only when it no longer ends in an incomplete UTF-8 sequence (U+FFFD), and
    the last len(longest stop) - 1 characters are held back until they cannot begin a stop string.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
    ):
        self.tokenizer, self.stop, self.skip = tokenizer, stop, skip_special_tokens
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""  # all output text so far (stop string excluded once found)
        self.num_emitted = 0  # characters of `text` already handed out
        self.hold_back = max((len(s) for s in stop), default=1) - 1

    def add(self, token_id: int) -> bool:
        """Append one token; True when the text now contains a stop string (then truncated)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False
        searched_from = max(0, len(self.text) - self.hold_back)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        hits = [i for i in (self.text.find(s, searched_from) for s in self.stop) if i != -1]
        if hits:
            self.text = self.text[: min(hits)]
        return bool(hits)

    def delta(self, finished: bool) -> str:
        """New text that is safe to show: all of it once finished."""
        upto = len(self.text) if finished else max(self.num_emitted, len(self.text) - self.hold_back)
        out, self.num_emitted = self.text[self.num_emitted : upto], upto
        return out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)
