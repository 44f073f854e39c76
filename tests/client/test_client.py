"""The project's own client (`client.Client`, `client.AsyncClient`) against the live server."""

from __future__ import annotations

import asyncio

import pytest

from client import (
    AdapterInfo,
    AsyncClient,
    AuthenticationError,
    BadRequestError,
    ChatCompletion,
    Client,
    Completion,
    ConflictError,
    ConnectionFailed,
    LoraserveError,
    NotFoundError,
)
from server.http.settings import Settings
from support.http import BASE, reference_text, serve
from support.servers import free_port

pytestmark = pytest.mark.real_model

KEY = "client-key"
PROMPT = "The capital of France is"
GREEDY = dict(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def served():
    with serve(Settings(api_key=KEY)) as served:
        yield served


@pytest.fixture(scope="module")
def client(served):
    with Client(served.url, api_key=KEY, timeout=120) as client:
        yield client


def test_complete_and_stream_complete(client):
    completion = client.complete(BASE, PROMPT, **GREEDY)
    assert isinstance(completion, Completion) and completion.model == BASE
    assert completion.text and completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 6

    deltas = list(client.stream_complete(BASE, PROMPT, **GREEDY))
    assert "".join(d.text for d in deltas) == completion.text
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    assert deltas[-1].usage is not None and deltas[-1].usage.completion_tokens == 6  # the client asks for usage


def test_chat_and_stream_chat(client):
    chat = client.chat(BASE, "What is the capital of France?", **GREEDY)
    assert isinstance(chat, ChatCompletion) and chat.text and chat.choices[0].message.role == "assistant"
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi!"}]
    assert client.chat(BASE, messages, **GREEDY).text

    deltas = list(client.stream_chat(BASE, "What is the capital of France?", **GREEDY))
    assert "".join(d.text for d in deltas) == chat.text
    assert deltas[-1].usage.completion_tokens == 6


def test_adapter_lifecycle(client, adapter_dirs):
    info = client.upload_adapter("client-alpha", adapter_dirs["alpha"])
    assert isinstance(info, AdapterInfo) and (info.name, info.rank, info.persisted) == ("client-alpha", 8, False)
    assert [a.name for a in client.adapters()] == ["client-alpha"]
    assert client.adapter("client-alpha").target_modules == info.target_modules
    models = {m.id: m for m in client.models()}
    assert set(models) == {BASE, "client-alpha"} and models["client-alpha"].parent == BASE
    text = client.complete("client-alpha", PROMPT, **GREEDY).text
    assert text == reference_text(adapter_dirs, PROMPT, "alpha", 6)

    with pytest.raises(ConflictError) as conflict:
        client.upload_adapter("client-alpha", adapter_dirs["beta"])
    assert conflict.value.status == 409 and conflict.value.code == "adapter_exists"
    client.upload_adapter("client-alpha", adapter_dirs["beta"], replace=True)
    assert client.complete("client-alpha", PROMPT, **GREEDY).text == reference_text(adapter_dirs, PROMPT, "beta", 6)

    client.delete_adapter("client-alpha")
    assert client.adapters() == []
    with pytest.raises(NotFoundError):
        client.adapter("client-alpha")
    with pytest.raises(NotFoundError):
        client.delete_adapter("client-alpha")


def test_typed_errors(served, client, tmp_path, adapter_dirs):
    with pytest.raises(NotFoundError) as not_found:
        client.complete("no-such-model", PROMPT, max_tokens=1)
    assert not_found.value.status == 404 and not_found.value.code == "model_not_found"
    with pytest.raises(NotFoundError):
        list(client.stream_chat("no-such-model", "hi", max_tokens=1))

    with pytest.raises(BadRequestError) as bad:
        client.complete(BASE, PROMPT, temperature=5)
    assert bad.value.status == 400 and bad.value.param == "temperature" and "temperature" in str(bad.value)
    with pytest.raises(BadRequestError) as bad_stream:
        list(client.stream_complete(BASE, PROMPT, max_tokens=0))
    assert bad_stream.value.param == "max_tokens"
    (tmp_path / "adapter_config.json").write_text("{not json")
    weights = "adapter_model.safetensors"
    (tmp_path / weights).write_bytes((adapter_dirs["alpha"] / weights).read_bytes())
    with pytest.raises(BadRequestError) as bad_upload:
        client.upload_adapter("broken", tmp_path)
    assert "adapter_config.json" in bad_upload.value.message and "JSON" in bad_upload.value.message

    for key in (None, "wrong"):
        with Client(served.url, api_key=key, timeout=30) as stranger:
            with pytest.raises(AuthenticationError) as denied:
                stranger.models()
            assert denied.value.status == 401

    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as nowhere:
        assert nowhere.ready() is False
        with pytest.raises(ConnectionFailed):
            nowhere.models()
        with pytest.raises(ConnectionFailed):
            list(nowhere.stream_complete(BASE, PROMPT))
    assert issubclass(ConnectionFailed, LoraserveError)
    assert client.ready() is True


def test_async_client(served, adapter_dirs):
    async def scenario():
        async with AsyncClient(served.url, api_key=KEY, timeout=120) as client:
            whole, chat = await asyncio.gather(
                client.complete(BASE, PROMPT, **GREEDY), client.chat(BASE, "What is the capital of France?", **GREEDY)
            )
            streamed = [d async for d in client.stream_complete(BASE, PROMPT, **GREEDY)]
            assert "".join(d.text for d in streamed) == whole.text
            streamed_chat = [d async for d in client.stream_chat(BASE, "What is the capital of France?", **GREEDY)]
            assert "".join(d.text for d in streamed_chat) == chat.text

            info = await client.upload_adapter("async-gamma", adapter_dirs["gamma"])
            assert info.name == "async-gamma"
            assert [a.name for a in await client.adapters()] == ["async-gamma"]
            assert (await client.adapter("async-gamma")).rank == 8
            assert "async-gamma" in [m.id for m in await client.models()]
            with pytest.raises(ConflictError):
                await client.upload_adapter("async-gamma", adapter_dirs["gamma"])
            await client.delete_adapter("async-gamma")
            with pytest.raises(NotFoundError):
                await client.complete("async-gamma", PROMPT, max_tokens=1)
            with pytest.raises(NotFoundError):
                [d async for d in client.stream_complete("async-gamma", PROMPT, max_tokens=1)]
            with pytest.raises(BadRequestError):
                await client.chat(BASE, [], max_tokens=1)
        async with AsyncClient(served.url, api_key="wrong", timeout=30) as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.adapters()
        async with AsyncClient(f"http://127.0.0.1:{free_port()}", timeout=5) as nowhere:
            with pytest.raises(ConnectionFailed):
                await nowhere.models()
            with pytest.raises(ConnectionFailed):
                [d async for d in nowhere.stream_chat(BASE, "hi")]

    asyncio.run(asyncio.wait_for(scenario(), 300))
