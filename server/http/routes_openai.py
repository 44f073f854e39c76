"""OpenAI-compatible generation routes: /v1/completions, /v1/chat/completions, /v1/models.

Each route checks the request's limits, resolves its adapter, tokenizes on a worker thread (never
on the event loop or the engine thread), and hands token ids to the engine. A client that goes
away aborts its requests, streaming or not.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from .api_models import (
    AdapterTerm,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
)
from .auth import require_api_key
from .json_body import OffLoopJSONRoute
from .limits import check_chat, check_completion
from .serving import (
    chat_events,
    chat_jobs,
    chat_response,
    collect_unless_disconnected,
    completion_events,
    completion_jobs,
    completion_response,
    error_events,
    submit_all,
    tokenize_jobs,
)
from .state import ServerState
from .structured import chat_plan, completion_plan
from .tool_calls import template_messages

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], route_class=OffLoopJSONRoute)


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    engine = state.ready_engine()
    check_completion(body, state.limits)
    tokens = engine.tokenization
    async with state.requesting(body.model, body.adapters) as adapter:
        plan = await asyncio.to_thread(completion_plan, body, engine.grammars)  # compiles the grammar
        jobs = await asyncio.to_thread(completion_jobs, body, tokens.prompt_text, plan)
        await asyncio.to_thread(tokenize_jobs, jobs, tokens)
        streams = await submit_all(engine, jobs, adapter, bool(body.stream))
    state.note_resolve_wait(streams)
    token_text = tokens.token_text
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(completion_events(body.model, jobs, streams, include_usage, token_text))
    results = await collect_unless_disconnected(streams, request)
    return completion_response(body.model, jobs, results, token_text)


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    engine = state.ready_engine()
    check_chat(body, state.limits)
    tokens = engine.tokenization
    async with state.requesting(body.model, body.adapters) as adapter:
        plan = await asyncio.to_thread(chat_plan, body, engine.grammars)  # compiles the grammar
        with_tools, with_tool_calls = tokens.renders_tools()
        messages = template_messages(body.messages, with_tool_calls)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools and with_tools else None
        prompt_ids = await asyncio.to_thread(tokens.chat_prompt, messages, tools)
        jobs = chat_jobs(body, prompt_ids, plan)
        streams = await submit_all(engine, jobs, adapter, bool(body.stream))
    state.note_resolve_wait(streams)
    token_text = tokens.token_text
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(chat_events(body.model, jobs, streams, include_usage, token_text))
    results = await collect_unless_disconnected(streams, request)
    return chat_response(body.model, jobs, results, token_text)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    engine = state.ready_engine()
    await state.sync_store()
    base = ModelCard(id=state.model_name, root=state.model_name)
    # root is the adapter's name, never a server path (vLLM shows its lora_path there)
    adapters = [
        ModelCard(
            id=info.name, parent=state.model_name, root=info.name, rank=info.rank, target_modules=info.target_modules
        )
        for info in engine.list_adapters()
    ]
    compositions = [
        ModelCard(
            id=name,
            parent=state.model_name,
            root=state.model_name,
            compose=[AdapterTerm(name=adapter, scale=scale) for adapter, scale in terms],
        )
        for name, terms in sorted(state.compositions.items())
    ]
    return ModelList(data=[base, *adapters, *compositions])


def _sse(events) -> StreamingResponse:
    return StreamingResponse(
        error_events(events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
