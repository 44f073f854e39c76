"""Python client for loraserve: `Client` (sync) and `AsyncClient`, over httpx.

Both share the request builders and parsers below; only the transport calls differ.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx

from .errors import ConnectionFailed, parse_error
from .types import AdapterAnalysis, AdapterInfo, AdapterSimilarity, ChatCompletion, Completion, ModelInfo, StreamDelta

DEFAULT_URL = "http://127.0.0.1:8000"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _completion_body(model: str, prompt: str | list[int], stream: bool, params: dict) -> dict:
    return {"model": model, "prompt": prompt, "stream": stream, **_stream_options(stream), **params}


def _chat_body(model: str, messages: list[dict] | str, stream: bool, params: dict) -> dict:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return {"model": model, "messages": messages, "stream": stream, **_stream_options(stream), **params}


def _stream_options(stream: bool) -> dict:
    return {"stream_options": {"include_usage": True}} if stream else {}


def _upload_parts(
    name: str, path: str | Path, replace: bool, energy: float | None, max_rank: int | None
) -> tuple[dict, dict]:
    directory = Path(path)
    files = {f: (f, (directory / f).read_bytes()) for f in ADAPTER_FILES if (directory / f).is_file()}
    data = {"name": name, "replace": "true" if replace else "false"}
    data.update({k: str(v) for k, v in (("energy", energy), ("max_rank", max_rank)) if v is not None})
    return data, files


def _compose_body(name: str, terms: Mapping[str, float], replace: bool) -> dict:
    return {"name": name, "compose": [{"name": n, "scale": s} for n, s in terms.items()], "replace": replace}


def _delta(line: str) -> StreamDelta | None:
    """One SSE line to a delta; None for keep-alives, blank lines and the final [DONE]."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    event = json.loads(data)
    usage = event.get("usage")
    if not event.get("choices"):
        return StreamDelta(usage=usage) if usage else None
    choice = event["choices"][0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content") or ""
    return StreamDelta(index=choice.get("index", 0), text=text, finish_reason=choice.get("finish_reason"))


def _check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise parse_error(response)
    return response


class Client:
    """Synchronous client. Every failure raises a `client.errors.LoraserveError` subclass."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.BaseTransport | None = None,
    ):
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport)

    def complete(self, model: str, prompt: str | list[int], **params: Any) -> Completion:
        return Completion(**self._json("POST", "/v1/completions", json=_completion_body(model, prompt, False, params)))

    def stream_complete(self, model: str, prompt: str | list[int], **params: Any) -> Iterator[StreamDelta]:
        yield from self._stream("/v1/completions", _completion_body(model, prompt, True, params))

    def chat(self, model: str, messages: list[dict] | str, **params: Any) -> ChatCompletion:
        return ChatCompletion(
            **self._json("POST", "/v1/chat/completions", json=_chat_body(model, messages, False, params))
        )

    def stream_chat(self, model: str, messages: list[dict] | str, **params: Any) -> Iterator[StreamDelta]:
        yield from self._stream("/v1/chat/completions", _chat_body(model, messages, True, params))

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(**m) for m in self._json("GET", "/v1/models")["data"]]

    def adapters(self) -> list[AdapterInfo]:
        return [AdapterInfo(**a) for a in self._json("GET", "/v1/adapters")["data"]]

    def adapter(self, name: str) -> AdapterInfo:
        return AdapterInfo(**self._json("GET", f"/v1/adapters/{name}"))

    def upload_adapter(
        self,
        name: str,
        path: str | Path,
        replace: bool = False,
        energy: float | None = None,
        max_rank: int | None = None,
    ) -> AdapterInfo:
        """Upload a PEFT directory; `energy`/`max_rank` have the server compress each layer's rank."""
        data, files = _upload_parts(name, path, replace, energy, max_rank)
        return AdapterInfo(**self._json("POST", "/v1/adapters", data=data, files=files))

    def compose(self, name: str, terms: Mapping[str, float], replace: bool = False) -> dict:
        """Name a composition, e.g. compose("sql-fr", {"sql": 0.5, "fr": 1.0}); use it as `model`."""
        return self._json("POST", "/v1/adapters", json=_compose_body(name, terms, replace))

    def analysis(self, name: str) -> AdapterAnalysis:
        return AdapterAnalysis(**self._json("GET", f"/v1/adapters/{name}/analysis"))

    def similarity(self, name: str, other: str) -> AdapterSimilarity:
        return AdapterSimilarity(**self._json("GET", f"/v1/adapters/{name}/similarity", params={"other": other}))

    def delete_adapter(self, name: str) -> None:
        self._json("DELETE", f"/v1/adapters/{name}")

    def ready(self) -> bool:
        try:
            return self._http.get("/ready").status_code == 200
        except httpx.TransportError:
            return False

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _json(self, method: str, path: str, **kwargs) -> dict:
        try:
            return _check(self._http.request(method, path, **kwargs)).json()
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {self._http.base_url}: {exc}") from exc

    def _stream(self, path: str, body: dict) -> Iterator[StreamDelta]:
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise parse_error(response)
                for line in response.iter_lines():
                    if (delta := _delta(line)) is not None:
                        yield delta
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"stream from {self._http.base_url} failed: {exc}") from exc


class AsyncClient:
    """The same API as `Client`, for asyncio."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=_headers(api_key), timeout=timeout, transport=transport
        )

    async def complete(self, model: str, prompt: str | list[int], **params: Any) -> Completion:
        body = _completion_body(model, prompt, False, params)
        return Completion(**await self._json("POST", "/v1/completions", json=body))

    async def stream_complete(self, model: str, prompt: str | list[int], **params: Any) -> AsyncIterator[StreamDelta]:
        async for delta in self._stream("/v1/completions", _completion_body(model, prompt, True, params)):
            yield delta

    async def chat(self, model: str, messages: list[dict] | str, **params: Any) -> ChatCompletion:
        body = _chat_body(model, messages, False, params)
        return ChatCompletion(**await self._json("POST", "/v1/chat/completions", json=body))

    async def stream_chat(self, model: str, messages: list[dict] | str, **params: Any) -> AsyncIterator[StreamDelta]:
        async for delta in self._stream("/v1/chat/completions", _chat_body(model, messages, True, params)):
            yield delta

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo(**m) for m in (await self._json("GET", "/v1/models"))["data"]]

    async def adapters(self) -> list[AdapterInfo]:
        return [AdapterInfo(**a) for a in (await self._json("GET", "/v1/adapters"))["data"]]

    async def adapter(self, name: str) -> AdapterInfo:
        return AdapterInfo(**await self._json("GET", f"/v1/adapters/{name}"))

    async def upload_adapter(
        self,
        name: str,
        path: str | Path,
        replace: bool = False,
        energy: float | None = None,
        max_rank: int | None = None,
    ) -> AdapterInfo:
        data, files = _upload_parts(name, path, replace, energy, max_rank)
        return AdapterInfo(**await self._json("POST", "/v1/adapters", data=data, files=files))

    async def compose(self, name: str, terms: Mapping[str, float], replace: bool = False) -> dict:
        return await self._json("POST", "/v1/adapters", json=_compose_body(name, terms, replace))

    async def analysis(self, name: str) -> AdapterAnalysis:
        return AdapterAnalysis(**await self._json("GET", f"/v1/adapters/{name}/analysis"))

    async def similarity(self, name: str, other: str) -> AdapterSimilarity:
        params = {"other": other}
        return AdapterSimilarity(**await self._json("GET", f"/v1/adapters/{name}/similarity", params=params))

    async def delete_adapter(self, name: str) -> None:
        await self._json("DELETE", f"/v1/adapters/{name}")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def _json(self, method: str, path: str, **kwargs) -> dict:
        try:
            return _check(await self._http.request(method, path, **kwargs)).json()
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"cannot reach {self._http.base_url}: {exc}") from exc

    async def _stream(self, path: str, body: dict) -> AsyncIterator[StreamDelta]:
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise parse_error(response)
                async for line in response.aiter_lines():
                    if (delta := _delta(line)) is not None:
                        yield delta
        except httpx.TransportError as exc:
            raise ConnectionFailed(f"stream from {self._http.base_url} failed: {exc}") from exc
