"""From OpenAI requests to engine requests and back: whole responses and SSE streams."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from server.http.api_models import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                         ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatTokenLogprob, CompletionChoice,
                         CompletionLogprobs, CompletionRequest, CompletionResponse, TopLogprob, Usage)
from server.engine.async_engine import AsyncEngine, RequestStream
from server.engine.errors import RequestError
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import RequestOutput, TokenLogprob


@dataclass
class Job:
    """One choice to generate: OpenAI's `index`, the prompt, its sampling rules."""

    index: int
    prompt: str | list[int]
    params: SamplingParams
    echo: str = ""


@dataclass
class Result:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    def add(self, output: RequestOutput) -> None:
        self.text += output.text
        self.logprobs += output.logprobs
        self.finish_reason = output.finish_reason
        self.num_prompt_tokens, self.num_output_tokens = output.num_prompt_tokens, output.num_output_tokens


def completion_jobs(request: CompletionRequest, prompt_text: Callable[[list[int]], str]) -> list[Job]:
    prompts = request.prompt
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise RequestError("must not be empty", field="prompt")
    jobs = []
    for p, prompt in enumerate(prompts):
        if not prompt:
            raise RequestError("must not be empty", field="prompt")
        echo = (prompt if isinstance(prompt, str) else prompt_text(prompt)) if request.echo else ""
        for c in range(request.n):
            jobs.append(Job(p * request.n + c, prompt, request.sampling_params(request.max_tokens, request.logprobs, c),
                            echo))
    return jobs


def chat_jobs(request: ChatCompletionRequest, prompt_ids: list[int]) -> list[Job]:
    max_tokens = request.max_completion_tokens or request.max_tokens
    top = (request.top_logprobs or 0) if request.logprobs else None
    return [Job(c, prompt_ids, request.sampling_params(max_tokens, top, c)) for c in range(request.n)]


async def submit_all(engine: AsyncEngine, jobs: list[Job], adapter: str | None) -> list[RequestStream]:
    """Queue every job; if one is refused, abort the ones already queued and re-raise."""
    streams: list[RequestStream] = []
    try:
        for job in jobs:
            streams.append(await engine.submit(job.prompt, job.params, adapter))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


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
                yield position, output
                if output.finished:
                    break
    finally:  # a client that went away cancels us: abort everything still running
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


def completion_response(model: str, jobs: list[Job], results: list[Result], token_text) -> CompletionResponse:
    choices = [CompletionChoice(index=job.index, text=job.echo + result.text,
                                logprobs=completion_logprobs(result.logprobs, token_text)
                                if job.params.logprobs is not None else None,
                                finish_reason=result.finish_reason)
               for job, result in zip(jobs, results)]
    return CompletionResponse(model=model, choices=choices, usage=_usage(jobs, results))


def chat_response(model: str, jobs: list[Job], results: list[Result], token_text) -> ChatCompletionResponse:
    choices = [ChatChoice(index=job.index, message=AssistantMessage(content=result.text),
                          logprobs=chat_logprobs(result.logprobs, token_text) if job.params.logprobs is not None else None,
                          finish_reason=result.finish_reason)
               for job, result in zip(jobs, results)]
    return ChatCompletionResponse(model=model, choices=choices, usage=_usage(jobs, results))


def _usage(jobs: list[Job], results: list[Result]) -> Usage:
    """Prompt tokens count once per distinct prompt, as OpenAI does for n > 1."""
    seen: dict[int, int] = {}
    for job, result in zip(jobs, results):
        seen.setdefault(id(job.prompt), result.num_prompt_tokens)
    prompt = sum(seen.values())
    completion = sum(r.num_output_tokens for r in results)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_logprobs(logprobs: list[TokenLogprob], token_text) -> CompletionLogprobs:
    out, offset = CompletionLogprobs(), 0
    for lp in logprobs:
        text = token_text(lp.token_id)
        out.tokens.append(text)
        out.token_logprobs.append(lp.logprob)
        out.top_logprobs.append({token_text(t): v for t, v in lp.top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(logprobs: list[TokenLogprob], token_text) -> ChatLogprobs:
    def entry(token_id: int, value: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": value, "bytes": list(text.encode())}

    return ChatLogprobs(content=[ChatTokenLogprob(**entry(lp.token_id, lp.logprob),
                                                  top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
                                 for lp in logprobs])


def sse(payload) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload.model_dump(exclude_none=False))
    return f"data: {data}\n\n"


async def completion_events(model: str, jobs: list[Job], streams: list[RequestStream], include_usage: bool,
                            token_text) -> AsyncIterator[str]:
    response_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    results = [Result() for _ in jobs]
    for job in jobs:
        if job.echo:
            yield sse(CompletionResponse(id=response_id, created=created, model=model,
                                         choices=[CompletionChoice(index=job.index, text=job.echo)]))
    async for position, output in merged(streams):
        job = jobs[position]
        results[position].add(output)
        logprobs = completion_logprobs(output.logprobs, token_text) if job.params.logprobs is not None else None
        yield sse(CompletionResponse(id=response_id, created=created, model=model, choices=[CompletionChoice(
            index=job.index, text=output.text, logprobs=logprobs, finish_reason=output.finish_reason)]))
    if include_usage:
        yield sse(CompletionResponse(id=response_id, created=created, model=model, choices=[],
                                     usage=_usage(jobs, results)))
    yield sse("[DONE]")


async def chat_events(model: str, jobs: list[Job], streams: list[RequestStream], include_usage: bool,
                      token_text) -> AsyncIterator[str]:
    response_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    results = [Result() for _ in jobs]

    def chunk(choices, usage_=None):
        return sse(ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices, usage=usage_))

    for job in jobs:
        yield chunk([ChatChunkChoice(index=job.index, delta=ChatDelta(role="assistant", content=""))])
    async for position, output in merged(streams):
        job = jobs[position]
        results[position].add(output)
        logprobs = chat_logprobs(output.logprobs, token_text) if job.params.logprobs is not None else None
        delta = ChatDelta(content=output.text) if output.text or not output.finished else ChatDelta()
        yield chunk([ChatChunkChoice(index=job.index, delta=delta, logprobs=logprobs,
                                     finish_reason=output.finish_reason)])
    if include_usage:
        yield chunk([], _usage(jobs, results))
    yield sse("[DONE]")
