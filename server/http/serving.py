"""From OpenAI requests to engine requests and back: whole responses and SSE streams."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from adapters.errors import LoraServeError
from server.engine.adapter_ref import AdapterRef
from server.engine.async_engine import AsyncEngine, RequestStream
from server.engine.errors import EngineFailedError, RequestError
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import RequestOutput, TokenLogprob
from server.engine.tokenization import Tokenization

from .api_models import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from .errors import ClientDisconnectedError, error_body
from .structured import OutputPlan
from .tool_calls import ToolCallStream, ToolMode, tool_calls

log = logging.getLogger(__name__)

# What a logprob of -inf (a token of probability 0) is reported as, as OpenAI does: JSON has no
# infinity (json.dumps writes one that strict parsers refuse, pydantic writes null, which OpenAI's
# chat schema does not allow).
LOGPROB_FLOOR = -9999.0


@dataclass
class Job:
    """One choice to generate: OpenAI's `index`, the prompt, its sampling rules."""

    index: int
    prompt: str | list[int]
    params: SamplingParams
    echo: str = ""
    tools: ToolMode | None = None  # the answer is tool calls


@dataclass
class Result:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        raise_if_failed(output)
        self.text += output.text
        self.logprobs += output.logprobs
        self.prompt_logprobs += output.prompt_logprobs
        self.finish_reason = output.finish_reason
        self.num_prompt_tokens, self.num_output_tokens = output.num_prompt_tokens, output.num_output_tokens


def completion_jobs(
    request: CompletionRequest, prompt_text: Callable[[list[int]], str], plan: OutputPlan = OutputPlan()
) -> list[Job]:
    prompts = request.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise RequestError("must not be empty", field="prompt")
    if request.max_tokens == 0 and not request.echo:
        raise RequestError(
            "must be at least 1 unless echo is true (0 scores the echoed prompt only)", field="max_tokens"
        )
    # With echo, logprobs cover the prompt's tokens too (vLLM's prompt_logprobs): lm-eval scores with them.
    prompt_logprobs = request.logprobs if request.echo else None
    jobs = []
    for p, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError("must not be empty", field="prompt")
        echo = (prompt if isinstance(prompt, str) else prompt_text(prompt)) if request.echo else ""
        for c in range(request.n):
            params = request.sampling_params(request.max_tokens, request.logprobs, c, prompt_logprobs, plan.grammar)
            jobs.append(Job(p * request.n + c, prompt, params, echo))
    return jobs


def chat_jobs(request: ChatCompletionRequest, prompt_ids: list[int], plan: OutputPlan = OutputPlan()) -> list[Job]:
    max_tokens = request.max_completion_tokens or request.max_tokens
    top = (request.top_logprobs or 0) if request.logprobs else None
    return [
        Job(c, prompt_ids, request.sampling_params(max_tokens, top, c, grammar=plan.grammar), tools=plan.tools)
        for c in range(request.n)
    ]


async def submit_all(engine: AsyncEngine, jobs: list[Job], adapter: AdapterRef, streamed: bool) -> list[RequestStream]:
    """Queue every job; if one is refused, abort the ones already queued and re-raise. Jobs not
    `streamed` get their outputs once, when they finish."""
    streams: list[RequestStream] = []
    try:
        for job in jobs:
            streams.append(await engine.submit(job.prompt, job.params, adapter, final_only=not streamed))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


def tokenize_jobs(jobs: list[Job], tokens: Tokenization) -> None:
    """Replace text prompts by their token ids (CPU work for a worker thread). Jobs that shared a
    prompt share its ids, so usage still counts each distinct prompt once."""
    ids: dict[int, list[int]] = {}
    for job in jobs:
        if isinstance(job.prompt, str):
            job.prompt = ids.setdefault(id(job.prompt), tokens.encode(job.prompt))


def raise_if_failed(output: RequestOutput) -> None:
    """The engine's "abort" is never a finish_reason a client sees: it is the error it carries."""
    if output.finish_reason == "abort":
        raise output.error or EngineFailedError("the request was aborted by the engine")


async def collect_unless_disconnected(streams: list[RequestStream], request: Request) -> list[Result]:
    """`collect`, but a client that disconnects first aborts the streams (and gets nothing)."""
    collecting = asyncio.ensure_future(collect(streams))
    watching = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()  # collect's own cleanup aborts every stream
    if not collecting.done() or collecting.cancelled():
        raise ClientDisconnectedError("the client disconnected before the response was ready")
    return collecting.result()


async def _disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body was read already, so the next ASGI
    message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def error_events(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE stream that fails mid-way ends with an OpenAI error event, then [DONE], as vLLM's."""
    try:
        async for event in events:
            yield event
    except LoraServeError as exc:
        yield sse(json.dumps(error_body(exc)))
        yield sse("[DONE]")
    except Exception as exc:  # a bug must still end the stream as OpenAI clients expect
        log.exception("a stream failed")
        yield sse(json.dumps(error_body(EngineFailedError(f"internal error ({type(exc).__name__})"))))
        yield sse("[DONE]")


async def collect(streams: list[RequestStream]) -> list[Result]:
    async def one(stream: RequestStream) -> Result:
        result = Result()
        try:
            async for output in stream:
                result.add(output)
        finally:
            stream.close()
        return result

    return list(await asyncio.gather(*(one(s) for s in streams)))


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Deltas of all streams as they come: (position in `streams`, delta)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(position: int, stream: RequestStream):
        async for output in stream:
            await queue.put((position, output))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                position, output = await queue.get()
                raise_if_failed(output)
                yield position, output
                if output.finished:
                    break
    finally:  # a client that went away cancels us: abort everything still running
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


def completion_response(model: str, jobs: list[Job], results: list[Result], token_text) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=job.index,
            text=job.echo + result.text,
            logprobs=completion_logprobs(result.prompt_logprobs + result.logprobs, token_text)
            if job.params.logprobs is not None
            else None,
            finish_reason=result.finish_reason,
        )
        for job, result in zip(jobs, results)
    ]
    return CompletionResponse(model=model, choices=choices, usage=_usage(jobs, results))


def chat_response(model: str, jobs: list[Job], results: list[Result], token_text) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=job.index,
            message=_message(job, result),
            logprobs=chat_logprobs(result.logprobs, token_text) if job.params.logprobs is not None else None,
            finish_reason=_finish_reason(job, result.finish_reason),
        )
        for job, result in zip(jobs, results)
    ]
    return ChatCompletionResponse(model=model, choices=choices, usage=_usage(jobs, results))


def _message(job: Job, result: Result) -> AssistantMessage:
    if job.tools is not None and result.finish_reason == "stop":
        return AssistantMessage(content=None, tool_calls=tool_calls(job.tools, result.text))
    return AssistantMessage(content=result.text)


def _finish_reason(job: Job, reason: str | None) -> str | None:
    """A tool-call answer whose grammar completed ends with "tool_calls", as OpenAI's does."""
    return "tool_calls" if job.tools is not None and reason == "stop" else reason


def _usage(jobs: list[Job], results: list[Result]) -> Usage:
    """Prompt tokens count once per distinct prompt, as OpenAI does for n > 1."""
    seen: dict[int, int] = {}
    for job, result in zip(jobs, results):
        seen.setdefault(id(job.prompt), result.num_prompt_tokens)
    prompt = sum(seen.values())
    completion = sum(r.num_output_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_logprobs(logprobs: list[TokenLogprob], token_text, offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy shape, as vLLM fills it: each top_logprobs entry holds the chosen token and
    the top N (so N + 1 entries at most); an echoed prompt's first token has None for both."""
    out = CompletionLogprobs()
    for lp in logprobs:
        text = token_text(lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(floored(lp.logprob))
        out.top_logprobs.append(
            None
            if lp.logprob is None
            else {text: floored(lp.logprob), **{token_text(t): floored(v) for t, v in lp.top}}
        )
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(logprobs: list[TokenLogprob], token_text) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": floored(value), "bytes": list(text.encode())}

    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                **entry(lp.token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top]
            )
            for lp in logprobs
        ]
    )


def floored(logprob: float | None) -> float | None:
    """A logprob as reported: never below LOGPROB_FLOOR, None only where nothing predicts the token
    (an echoed prompt's first). NaN cannot reach here (the engine fails a row whose logits are not
    finite); were it to, the floor still keeps the JSON valid."""
    return logprob if logprob is None or logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload.model_dump(exclude_none=False))
    return f"data: {data}\n\n"


async def completion_events(
    model: str, jobs: list[Job], streams: list[RequestStream], include_usage: bool, token_text
) -> AsyncIterator[str]:
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    results = [Result() for _ in jobs]
    for job in jobs:
        if job.echo and job.params.logprobs is None:
            yield sse(
                CompletionResponse(
                    id=response_id,
                    created=created,
                    model=model,
                    choices=[CompletionChoice(index=job.index, text=job.echo)],
                )
            )
    async for position, output in merged(streams):
        job, result = jobs[position], results[position]
        # echo with logprobs: the prompt goes out with the first delta, once its scores are in
        echo = job.echo if job.params.logprobs is not None and not result.prompt_logprobs else ""
        offset = len(job.echo) + len(result.text) if not echo else 0
        result.add(output)
        logprobs = (
            completion_logprobs(output.prompt_logprobs + output.logprobs, token_text, offset)
            if job.params.logprobs is not None
            else None
        )
        yield sse(
            CompletionResponse(
                id=response_id,
                created=created,
                model=model,
                choices=[
                    CompletionChoice(
                        index=job.index, text=echo + output.text, logprobs=logprobs, finish_reason=output.finish_reason
                    )
                ],
            )
        )
    if include_usage:
        yield sse(
            CompletionResponse(id=response_id, created=created, model=model, choices=[], usage=_usage(jobs, results))
        )
    yield sse("[DONE]")


async def chat_events(
    model: str, jobs: list[Job], streams: list[RequestStream], include_usage: bool, token_text
) -> AsyncIterator[str]:
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    results = [Result() for _ in jobs]

    def chunk(choices, usage_=None):
        return sse(ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, usage=usage_))

    calls = [ToolCallStream(job.tools) if job.tools is not None else None for job in jobs]
    for job, call in zip(jobs, calls):
        first = ChatDelta(role="assistant", content=None if call else "", tool_calls=call and call.start())
        yield chunk([ChatChunkChoice(index=job.index, delta=first)])
    async for position, output in merged(streams):
        job, call = jobs[position], calls[position]
        results[position].add(output)
        logprobs = chat_logprobs(output.logprobs, token_text) if job.params.logprobs is not None else None
        if call is not None:
            delta = ChatDelta(tool_calls=call.add(output.text, output.finished and output.finish_reason == "stop"))
        else:
            delta = ChatDelta(content=output.text) if output.text or not output.finished else ChatDelta()
        yield chunk(
            [
                ChatChunkChoice(
                    index=job.index,
                    delta=delta,
                    logprobs=logprobs,
                    finish_reason=_finish_reason(job, output.finish_reason),
                )
            ]
        )
    if include_usage:
        yield chunk([], _usage(jobs, results))
    yield sse("[DONE]")
