"""Adapter management: upload, list, show, delete; and vLLM's load/unload by server path."""

from __future__ import annotations

import asyncio
import functools
import os
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.types import Message

from adapters import (
    AdapterExistsError,
    AdapterInfo,
    AdapterNotFoundError,
    InvalidAdapterError,
    UnsafeAdapterFormatError,
)
from adapters.compress import CompressionReport, check_compression, compress_files
from adapters.peft_format import PICKLE_FILE
from server.engine.torch_threads import torch_job
from server.store import ADAPTER_FILES, is_valid_name

from .api_models import (
    AdapterCard,
    AdapterList,
    ComposeRequest,
    Compression,
    LoadLoraRequest,
    UnloadLoraRequest,
)
from .auth import require_admin_key, require_api_key
from .errors import HTTPError
from .json_body import OffLoopJSONRoute
from .state import ServerState

router = APIRouter(prefix="/v1", route_class=OffLoopJSONRoute)  # JSON bodies parsed off the loop
read = [Depends(require_api_key)]
admin = [Depends(require_api_key), Depends(require_admin_key)]


def _state(request: Request) -> ServerState:
    return request.app.state.server


def _card(state: ServerState, info: AdapterInfo) -> AdapterCard:
    persisted = state.store is not None and info.name in state.store
    resolved_from = state.resolver.origins.get(info.name) if state.resolver is not None else None
    return AdapterCard.of(info, persisted, resolved_from)


@router.post("/adapters", status_code=201, response_model=AdapterCard, dependencies=admin)
async def upload_adapter(request: Request) -> JSONResponse:
    """multipart/form-data: `name`, files adapter_config.json and adapter_model.safetensors, `replace`;
    optional `energy` and `max_rank` compress every layer to the rank it uses (the stored copy too).
    A JSON body `{"name", "compose": [{"name", "scale"}, ...], "replace"}` names a composition instead."""
    state = _state(request)
    if request.headers.get("content-type", "").startswith("application/json"):
        return await _compose(state, request)
    limit = state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    engine = state.ready_engine()
    async with _limited(request, limit).form(max_part_size=limit) as form:
        name = state.check_name_free(str(form.get("name") or ""))
        replace = str(form.get("replace", "false")).lower() in ("1", "true", "yes")
        energy, max_rank = _compression_fields(form)
        files = await _read_files(form, limit)
    if engine.has_adapter(name) and not replace:
        raise AdapterExistsError(f"adapter {name!r} already exists; send replace=true to overwrite")
    report = None
    if energy is not None or max_rank is not None:  # CPU work: a worker thread, not the loop or the engine
        compress = functools.partial(compress_files, files, energy=energy, max_rank=max_rank)
        files, report = await request.app.state.analysis_pool.run(compress)  # SVDs: analysis work
    # Validate first: nothing reaches the store or the registry unless it is sound.
    adapter = await torch_job(engine.parse_adapter, name, files)
    if state.store is None:
        info = await state.register(name, files, replace, adapter=adapter)
    else:  # the store decides who gets a new name, atomically across replicas
        path = await asyncio.to_thread(state.store.save, name, files, replace)
        if state.budget is not None:  # uploaded: exists nowhere else, so never evicted
            await asyncio.to_thread(state.budget.forget, name)
        info = await state.register(name, path, True, adapter=adapter, store_version=path.name)
    card = _card(state, info)
    card.compression = _compression(report)
    return JSONResponse(card.model_dump(), status_code=201)


async def _compose(state: ServerState, request: Request) -> JSONResponse:
    try:
        body = ComposeRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidAdapterError(first["msg"], field=".".join(str(p) for p in first["loc"]) or None) from None
    terms = tuple((term.name, term.scale) for term in body.compose)
    await state.add_composition(body.name, terms, body.replace)
    card = {
        "name": body.name,
        "object": "composition",
        "parent": state.model_name,
        "compose": [term.model_dump() for term in body.compose],
    }
    return JSONResponse(card, status_code=201)


def _compression_fields(form) -> tuple[float | None, int | None]:
    """The optional `energy` and `max_rank` form fields; a bad one is a 400 naming it."""
    values = []
    for field, kind in (("energy", float), ("max_rank", int)):
        raw = form.get(field)
        try:
            values.append(None if raw in (None, "") else kind(str(raw)))
        except ValueError:
            raise InvalidAdapterError(
                f"must be a {'number' if kind is float else 'whole number'}, got {str(raw)[:40]!r}", field=field
            ) from None
    if values != [None, None]:
        check_compression(*values)
    return values[0], values[1]


def _compression(report: CompressionReport | None) -> Compression | None:
    if report is None:
        return None
    return Compression(
        rank_before=report.rank_before,
        params_before=report.params_before,
        params_after=report.params_after,
        energy_kept=report.energy_kept,
    )


def _limited(request: Request, limit: int) -> Request:
    """The same request, with a body that fails with 413 as soon as more than `limit` bytes have
    arrived, chunked or not: nothing past the limit is buffered in memory or spooled to disk."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        message = await request.receive()
        received += len(message.get("body", b""))
        if received > limit:
            raise _too_large(limit)
        return message

    return Request(request.scope, receive)


def _too_large(limit: int) -> HTTPError:
    return HTTPError(413, f"upload is larger than the limit of {limit} bytes (setting max_upload_bytes)", "too_large")


async def _read_files(form, limit: int) -> dict[str, bytes]:
    files, total = {}, 0
    for field, value in form.multi_items():
        if not isinstance(value, UploadFile):
            continue
        file_name = field if field in (*ADAPTER_FILES, PICKLE_FILE) else os.path.basename(value.filename or "")
        data = await value.read()
        total += len(data)
        if total > limit:
            raise _too_large(limit)
        files[file_name] = data
    if PICKLE_FILE in files and ADAPTER_FILES[1] not in files:
        raise UnsafeAdapterFormatError(
            "pickle weights are refused because loading them can run arbitrary code; convert them to safetensors",
            file=PICKLE_FILE,
        )
    for required in ADAPTER_FILES:
        if required not in files:
            raise InvalidAdapterError("file part is missing from the upload", file=required)
    return files


@router.get("/adapters", response_model=AdapterList, dependencies=read)
async def list_adapters(request: Request) -> AdapterList:
    state = _state(request)
    await state.sync_store()
    return AdapterList(data=[_card(state, info) for info in state.ready_engine().list_adapters()])


@router.get("/adapters/{name}", response_model=AdapterCard, dependencies=read)
async def show_adapter(name: str, request: Request) -> AdapterCard:
    state = _state(request)
    if name == state.model_name:
        raise AdapterNotFoundError(f"{name!r} is the base model, not an adapter")
    await state.resolve_model(name)  # also picks up one uploaded by another replica
    return _card(state, state.ready_engine().adapter_info(name))


@router.delete("/adapters/{name}", dependencies=admin)
async def delete_adapter(name: str, request: Request) -> dict:
    """Unregister and delete from the store; running requests that use it finish first."""
    state = _state(request)
    engine = state.ready_engine()
    if name in state.compositions:
        await state.remove_composition(name)
        return {"id": name, "object": "composition", "deleted": True}
    state.check_unused(name)
    await state.stored(name)  # a resolution's store write still under way would bring it back
    in_store = state.store is not None and is_valid_name(name) and name in state.store
    if not engine.has_adapter(name) and not in_store:
        engine.adapter_info(name)  # raises the typed 404
    if in_store:
        await asyncio.to_thread(state.store.delete, name)
    if engine.has_adapter(name):
        await state.unregister(name)
    return {"id": name, "object": "adapter", "deleted": True}


@router.post("/load_lora_adapter", dependencies=admin)
async def load_lora_adapter(body: LoadLoraRequest, request: Request) -> PlainTextResponse:
    """vLLM's API: register an adapter directory that lies under --adapter-root, or, with
    --adapter-source-in-load, `<a configured source's URI>/<adapter>`."""
    state = _state(request)
    if state.settings.adapter_source_in_load and "://" in body.lora_path:
        if await state.is_adapter_name(body.lora_name):
            raise AdapterExistsError(f"adapter {body.lora_name!r} already exists")
        await state.load_from_source(body.lora_name, body.lora_path, body.energy, body.max_rank)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")
    root = state.settings.adapter_root
    if root is None:
        raise HTTPError(
            403,
            "loading adapters by path is disabled: start the server with --adapter-root",
            "adapter_root_unset",
            "lora_path",
        )
    try:
        path = Path(os.path.realpath(body.lora_path))
    except (ValueError, OSError) as exc:  # e.g. an embedded NUL byte
        raise HTTPError(400, f"lora_path is not a valid path ({exc})", "invalid_path", "lora_path") from None
    real_root = os.path.realpath(root)
    outside = [p for p in [path, *_entries(path)] if not Path(os.path.realpath(p)).is_relative_to(real_root)]
    if outside:  # the directory, or a file in it linked elsewhere: the loader would read outside the root
        raise HTTPError(
            400,
            f"lora_path must lie under the adapter root {str(root)!r}, with every file in it "
            f"({outside[0].name!r} does not)",
            "path_outside_root",
            "lora_path",
        )
    _check_directory(path)
    state.check_name_free(body.lora_name)
    if await state.is_adapter_name(body.lora_name):  # a stored adapter too, unloaded or not
        raise AdapterExistsError(f"adapter {body.lora_name!r} already exists")
    source = path
    if body.energy is not None or body.max_rank is not None:  # served from the compressed files' bytes
        compress = functools.partial(compress_files, path, energy=body.energy, max_rank=body.max_rank)
        source, _ = await request.app.state.analysis_pool.run(compress)
    await state.register(body.lora_name, source)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter", dependencies=admin)
async def unload_lora_adapter(body: UnloadLoraRequest, request: Request) -> PlainTextResponse:
    """vLLM's API: free the adapter's memory. A copy in the adapter store stays there and is
    loaded again on its next use; DELETE /v1/adapters/{name} removes it for good."""
    state = _state(request)
    state.check_unused(body.lora_name)
    await state.unregister(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _check_directory(path: Path) -> None:
    """`lora_path` (inside the root, checked first) is a directory; any OSError resolving it (a name
    longer than the filesystem's limit, no permission, a loop) is the client's path, a 400 naming it."""
    try:
        is_dir = path.is_dir()
    except OSError as exc:
        raise HTTPError(400, f"lora_path cannot be read ({exc.strerror})", "invalid_path", "lora_path") from None
    if not is_dir:
        raise HTTPError(400, "lora_path: the adapter directory does not exist", "invalid_path", "lora_path")


def _entries(path: Path) -> list[Path]:
    """What a loader could open under `path`; nothing if it is not a readable directory."""
    try:
        return list(path.iterdir())
    except OSError:
        return []
