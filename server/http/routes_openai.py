"""OpenAI-compatible generation routes: /v1/completions, /v1/chat/completions, /v1/models."""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.http.api_models import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                         ModelCard, ModelList)
from server.http.auth import require_api_key
from server.http.serving import (chat_events, chat_jobs, chat_response, collect, completion_events, completion_jobs,
                      completion_response, submit_all)
from server.http.state import ServerState

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.post("/completions", response_model=CompletionResponse)
async def completions(body: CompletionRequest, request: Request):
    state = _state(request)
    engine = state.ready_engine()
    adapter = state.resolve_model(body.model)
    tokenizer = engine.engine.tokenizer
    jobs = completion_jobs(body, lambda ids: tokenizer.decode(engine.engine.encode_prompt(ids)))
    streams = await submit_all(engine, jobs, adapter)
    token_text = _token_text(tokenizer)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(completion_events(body.model, jobs, streams, include_usage, token_text))
    return completion_response(body.model, jobs, await collect(streams), token_text)


@router.post("/chat/completions", response_model=ChatCompletionResponse)
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = _state(request)
    engine = state.ready_engine()
    adapter = state.resolve_model(body.model)
    prompt_ids = engine.engine.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
    jobs = chat_jobs(body, prompt_ids)
    streams = await submit_all(engine, jobs, adapter)
    token_text = _token_text(engine.engine.tokenizer)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse(chat_events(body.model, jobs, streams, include_usage, token_text))
    return chat_response(body.model, jobs, await collect(streams), token_text)


@router.get("/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    state = _state(request)
    engine = state.ready_engine().engine
    state.sync_store()
    base = ModelCard(id=state.model_name, root=state.model_name)
    adapters = [ModelCard(id=info.name, parent=state.model_name, root=info.source or info.name,
                          rank=info.rank, target_modules=info.target_modules)
                for info in engine.registry.list()]
    return ModelList(data=[base, *adapters])


def _token_text(tokenizer):
    return lambda token_id: tokenizer.decode([token_id])


def _sse(events) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
