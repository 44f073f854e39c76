"""Tokenization: text to token ids and back, one place for the engine and the HTTP layer.

The HTTP layer tokenizes on worker threads (never on the event loop or the engine thread) and the
engine checks what it is handed; both go through this object, so a prompt, a chat template and a
token's text mean the same on both sides of the boundary. Streaming output has its own
`IncrementalDetokenizer` (detokenizer.py): it holds per-request state.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .errors import RequestError


class Tokenization:
    """The model's tokenizer with the rules loraserve adds: prompts checked against the vocabulary."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text, as the tokenizer makes them (special tokens included)."""
        return self.tokenizer.encode(text)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A prompt's token ids. An id outside the vocabulary is refused here: inside a step it
        would fail the forward pass of every request sharing the batch."""
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not prompt_ids:
            raise RequestError("must not be empty", field="prompt")
        bad = next((t for t in prompt_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0 to {self.vocab_size - 1})", field="prompt")
        return prompt_ids

    def prompt_text(self, prompt_ids: list[int]) -> str:
        """The text of a prompt given as token ids (what `echo` returns), checked as a prompt is."""
        return self.tokenizer.decode(self.encode_prompt(prompt_ids))

    def token_text(self, token_id: int) -> str:
        """One token's text, as logprobs report it."""
        return self.tokenizer.decode([token_id])

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of `messages` (and `tools`, where the template renders them) through the
        tokenizer's own chat template."""
        text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def renders_tools(self) -> tuple[bool, bool]:
        """(renders `tools`, renders `tool_calls`): whether the chat template mentions them at all."""
        template = self.tokenizer.chat_template if isinstance(self.tokenizer.chat_template, str) else ""
        return "tools" in template, "tool_calls" in template
