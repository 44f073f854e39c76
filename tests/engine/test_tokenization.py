"""Tokenization: the one place prompts become token ids and tokens become text, for engine and HTTP."""

from __future__ import annotations

import functools

import pytest
from transformers import AutoTokenizer

from server.engine.errors import RequestError
from server.engine.model_loader import resolve_model_dir
from server.engine.tokenization import Tokenization


@functools.cache
def tokens() -> Tokenization:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(None)[0])
    return Tokenization(tokenizer, vocab_size=len(tokenizer))


def test_text_and_token_prompts_encode_alike_and_read_back():
    ids = tokens().encode_prompt("The quick brown fox")
    assert ids == tokens().tokenizer.encode("The quick brown fox") == tokens().encode("The quick brown fox")
    assert tokens().encode_prompt(ids) == ids
    assert tokens().prompt_text(ids) == "The quick brown fox"
    assert "".join(tokens().token_text(t) for t in ids) == "The quick brown fox"


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("", "must not be empty"),
        ([], "must not be empty"),
        ([1, -1], "outside the vocabulary"),
        ([1, 10**9], "outside the vocabulary"),
    ],
)
def test_a_bad_prompt_is_refused_naming_the_prompt_field(prompt, message):
    with pytest.raises(RequestError, match=message) as refused:
        tokens().encode_prompt(prompt)
    assert refused.value.field == "prompt"
    with pytest.raises(RequestError):  # echo reads a prompt back through the same check
        tokens().prompt_text(prompt) if isinstance(prompt, list) else tokens().encode_prompt(prompt)


def test_chat_prompt_is_the_tokenizers_own_template():
    messages = [{"role": "user", "content": "Say hi"}]
    tokenizer = tokens().tokenizer
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokens().chat_prompt(messages) == tokenizer.encode(text, add_special_tokens=False)
    assert tokens().renders_tools() == ("tools" in tokenizer.chat_template, "tool_calls" in tokenizer.chat_template)
