"""Tensors of a safetensors file as views of the bytes they arrived in, never copies; also of a file
still arriving (`layout` needs only the header, each tensor's view only its own bytes).

Why not the safetensors library: its `load(bytes)` copies every tensor out of the buffer (~12 ms and
~7,000 page faults of fresh memory for a 29 MB adapter, on an adapter's first request), and it reads
nothing of a file until the file is whole. The format is a little-endian u64 header length, a JSON
header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then the data; this module checks
what the library checks (header bounds, offsets that tile the data exactly, sizes that match shapes)
and tests/adapters/test_safetensors_view.py holds it to the library on good and broken files. The
library still writes every file this project saves. Little-endian hosts only (x86, ARM), as the
format's byte order is.
"""

from __future__ import annotations

import json
import math
import struct
import warnings
from typing import NamedTuple

import torch

MAX_HEADER_BYTES = 100_000_000  # the library's own limit
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
# A view of an immutable `bytes` (an upload, a file read whole) is only ever read: slots copy it.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class TensorSpan(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    start: int  # in the file, not the data section
    stop: int


def header_size(prefix: bytes | memoryview) -> int | None:
    """Bytes of the file up to the data section, once its first 8 have arrived."""
    if len(prefix) < 8:
        return None
    (length,) = struct.unpack("<Q", bytes(prefix[:8]))
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"header of {length} bytes is larger than {MAX_HEADER_BYTES}")
    return 8 + length


def layout(prefix: bytes | memoryview, file_size: int) -> dict[str, TensorSpan]:
    """Every tensor's place in a file of `file_size` bytes, from its first `header_size` bytes;
    ValueError naming what is wrong."""
    start = header_size(prefix)
    if start is None or start > min(len(prefix), file_size):
        raise ValueError("the file ends inside its header")
    try:
        header = json.loads(bytes(prefix[8:start]), object_pairs_hook=_unique)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("__metadata__ must map names to strings")
    spans = {name: _span(name, info, start) for name, info in header.items()}
    end = start
    for span in sorted(spans.values(), key=lambda s: (s.start, s.stop)):  # tiled: no gap, no overlap
        if span.start != end:
            raise ValueError(f"tensor data offsets leave a gap or overlap at byte {end - start}")
        end = span.stop
    if end != file_size:
        raise ValueError(f"tensors cover {end} of the file's {file_size} bytes")
    return spans


def tensor_views(data: bytes | memoryview | bytearray) -> dict[str, torch.Tensor]:
    """Every tensor of a whole file, as views of `data` (which they keep alive)."""
    buffer = _as_bytes_tensor(data)
    spans = layout(memoryview(data)[: min(len(data), MAX_HEADER_BYTES + 8)], len(data))
    return {name: view(buffer, span) for name, span in spans.items()}


def view(buffer: torch.Tensor, span: TensorSpan) -> torch.Tensor:
    """One tensor of a file held in `buffer` (uint8): a view, or a copy where its offset is not a
    multiple of its element size (the library's writer aligns them; other writers may not)."""
    dtype = DTYPES[span.dtype]
    data = buffer[span.start : span.stop]
    if (buffer.data_ptr() + span.start) % dtype.itemsize:
        data = data.clone()
    return data.view(dtype).view(span.shape)


def _as_bytes_tensor(data) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if len(data) == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(data, dtype=torch.uint8)


def _span(name: str, info, header_end: int) -> TensorSpan:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise ValueError(f"tensor {name!r}: expected dtype, shape and data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int and n >= 0 for n in offsets)):
        raise ValueError(f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise ValueError(f"tensor {name!r}: {end - begin} bytes do not hold shape {shape} of {dtype}")
    return TensorSpan(dtype, tuple(shape), header_end + begin, header_end + end)


def _unique(pairs: list[tuple[str, object]]) -> dict:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("header names a tensor twice")
    return result
