"""Streaming detokenization on the real default tokenizer: whole characters, no stop-string leaks."""

from __future__ import annotations

import pytest

from server.engine.detokenizer import IncrementalDetokenizer

PROMPT = "User: tell me something.\nAssistant:"


def stream(tokenizer, text: str, stop: list[str] | None = None) -> tuple[list[str], IncrementalDetokenizer, bool]:
    """Feed `text`'s tokens one by one as the engine does; returns the deltas, the detokenizer, stopped."""
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(PROMPT), stop or [])
    deltas, stopped = [], False
    for token in tokenizer.encode(text):
        stopped = detok.add(token)
        deltas.append(detok.delta(finished=stopped))
        if stopped:
            break
    if not stopped:
        deltas.append(detok.delta(finished=True))  # the engine's last output, at max_tokens
    return deltas, detok, stopped


@pytest.mark.parametrize(
    "text",
    [
        " Hello world, this is a plain sentence.\nWith a second line.",
        " Emoji 🙂👍🏽 and 日本語の文章です。Ünïcödé ok 😀",
        "🙂🙂 中文字符测试 ok",
    ],
)
def test_deltas_concatenate_to_the_text_and_hold_whole_characters(tokenizer, text):
    deltas, detok, stopped = stream(tokenizer, text)
    assert not stopped
    assert "".join(deltas) == detok.text == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_multibyte_characters_span_tokens(tokenizer):
    """Precondition of the test above: some tokens carry only part of a character's UTF-8 bytes."""
    ids = tokenizer.encode(" Emoji 🙂👍🏽 and 日本語")
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        (" The answer is 42. END OF TEXT and more", ["END OF TEXT"], " The answer is 42. "),
        # starts and ends inside tokens (" END", " OF", " TEXT")
        (" The answer is 42. END OF TEXT and more", ["ND OF TEX"], " The answer is 42. E"),
        # an almost-stop is real text and must come out whole
        (" look: END OF TEX but END OF TEXT stops", ["END OF TEXT"], " look: END OF TEX but "),
    ],
)
def test_stop_string_across_tokens_never_leaks(tokenizer, text, stop, expected):
    assert len(tokenizer.encode(stop[0])) > 1
    deltas, detok, stopped = stream(tokenizer, text, stop)
    assert stopped
    assert detok.text == expected
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert expected.startswith(emitted), f"leaked {emitted!r}"
    assert emitted == expected


def test_earliest_stop_string_wins(tokenizer):
    # " cd" completes both at once; "ab cd" starts earlier, though listed second.
    deltas, detok, stopped = stream(tokenizer, " xx ab cd ef", ["cd", "ab cd"])
    assert stopped
    assert detok.text == "".join(deltas) == " xx "


def test_earliest_stop_string_wins_in_later_token(tokenizer):
    deltas, detok, stopped = stream(tokenizer, " say hello to the world", ["world", "hello"])
    assert stopped
    assert detok.text == "".join(deltas) == " say "
