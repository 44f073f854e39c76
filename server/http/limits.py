"""Request limits checked on the event loop before any tokenizing: cheap, and each names its field.

Stop strings are matched against every new token on the engine thread, and a prompt is tokenized
on a worker thread; both cost in proportion to what a client sends, so both are bounded here.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from server.engine.errors import PromptTooLongError, RequestError

from .api_models import ChatCompletionRequest, CompletionRequest


@dataclass(frozen=True)
class RequestLimits:
    max_stop_sequences: int
    max_stop_length: int  # characters per stop string
    max_prompt_bytes: int  # UTF-8 bytes of a prompt (or of a chat's messages together)
    max_prompt_tokens: int  # token ids of a token-id prompt
    max_adapters_per_request: int = 4  # entries of the `adapters` composition field
    max_prompts_per_request: int = 64  # entries of a completion's list `prompt`
    max_stop_token_ids: int = 128  # each generated token is looked up in them on the engine thread
    vocab_size: int | None = None  # token ids in stop_token_ids and logit_bias must be below it


def max_token_bytes(tokenizer: PreTrainedTokenizerBase) -> int:
    """The most UTF-8 bytes one token stands for: a prompt of more than max_model_len times this
    many bytes cannot fit the context, so it can be refused without tokenizing it."""
    vocabulary = range(len(tokenizer))
    return max(len(text.encode()) for text in tokenizer.batch_decode([[i] for i in vocabulary]))


def check_completion(body: CompletionRequest, limits: RequestLimits) -> None:
    _check_stop(body.stop, limits)
    _check_token_ids(body, limits)
    _check_adapters(body, limits)
    prompts = [body.prompt] if isinstance(body.prompt, str) or _is_ids(body.prompt) else body.prompt
    if len(prompts) > limits.max_prompts_per_request:
        raise RequestError(
            f"at most {limits.max_prompts_per_request} prompts per request, got {len(prompts)} "
            "(setting max_prompts_per_request)",
            field="prompt",
        )
    for prompt in prompts:
        if isinstance(prompt, str):
            _check_bytes(len(prompt.encode()), limits, "prompt")
        elif len(prompt) > limits.max_prompt_tokens:
            raise PromptTooLongError(
                f"{len(prompt)} token ids are more than the maximum context length of "
                f"{limits.max_prompt_tokens} tokens",
                field="prompt",
            )


def check_chat(body: ChatCompletionRequest, limits: RequestLimits) -> None:
    _check_stop(body.stop, limits)
    _check_content_parts(body)
    if body.top_logprobs is not None and not body.logprobs:  # OpenAI's rule too: never ignored
        raise RequestError("needs logprobs: true", field="top_logprobs")
    _check_token_ids(body, limits)
    _check_adapters(body, limits)
    _check_bytes(
        sum(
            len(m.text().encode()) + sum(len(c.function.arguments.encode()) for c in m.tool_calls or [])
            for m in body.messages
        ),
        limits,
        "messages",
    )


def _check_content_parts(body: ChatCompletionRequest) -> None:
    """Only text parts are served: an image, audio or file part would be dropped unseen by this
    text-only model, so it is refused by name instead."""
    for i, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if part.type != "text":
                raise RequestError(
                    f"content parts of type {part.type[:40]!r} are not served: the model reads text only",
                    field=f"messages[{i}].content[{j}].type",
                )
            if part.text is None:
                raise RequestError("a text part needs its text", field=f"messages[{i}].content[{j}].text")


def _is_ids(prompt) -> bool:
    return bool(prompt) and isinstance(prompt[0], int)


def _check_stop(stop: str | list[str] | None, limits: RequestLimits) -> None:
    stops = [stop] if isinstance(stop, str) else stop or []
    if len(stops) > limits.max_stop_sequences:
        raise RequestError(
            f"at most {limits.max_stop_sequences} stop sequences are allowed, got {len(stops)} "
            "(setting max_stop_sequences)",
            field="stop",
        )
    longest = max((len(s) for s in stops), default=0)
    if longest > limits.max_stop_length:
        raise RequestError(
            f"a stop sequence may be at most {limits.max_stop_length} characters, got {longest} "
            "(setting max_stop_length)",
            field="stop",
        )
    if any(s == "" for s in stops):
        raise RequestError("stop sequences must not be empty", field="stop")


def _check_token_ids(body: CompletionRequest | ChatCompletionRequest, limits: RequestLimits) -> None:
    """stop_token_ids and logit_bias name token ids: bounded in number and inside the vocabulary, so
    neither the per-token stop check nor a sampling step can be made slow or fail."""
    stop_ids = body.stop_token_ids or []
    if len(stop_ids) > limits.max_stop_token_ids:
        raise RequestError(
            f"at most {limits.max_stop_token_ids} token ids, got {len(stop_ids)} (setting max_stop_token_ids)",
            field="stop_token_ids",
        )
    for field, ids in (("stop_token_ids", stop_ids), ("logit_bias", list(body.token_biases() or {}))):
        bad = next((i for i in ids if i < 0 or (limits.vocab_size is not None and i >= limits.vocab_size)), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary (0 to {limits.vocab_size - 1})", field=field)


def _check_adapters(body: CompletionRequest | ChatCompletionRequest, limits: RequestLimits) -> None:
    if body.adapters is not None and len(body.adapters) > limits.max_adapters_per_request:
        raise RequestError(
            f"at most {limits.max_adapters_per_request} adapters may be composed per request, got "
            f"{len(body.adapters)} (setting max_adapters_per_request)",
            field="adapters",
        )


def _check_bytes(num_bytes: int, limits: RequestLimits, field: str) -> None:
    if num_bytes > limits.max_prompt_bytes:
        raise PromptTooLongError(
            f"{num_bytes} bytes are more than the limit of {limits.max_prompt_bytes} (setting max_prompt_bytes)",
            field=field,
        )
