"""What an adapter's parse reads of its weights file's bytes, read while the file still downloads.

A parse (peft_format.load_adapter) copies no tensor: A and B stay views of the file's bytes, cast
and scaled as a device slot loads them (`factor_values.slot_values`). It reads the bytes for two things: the
file's BLAKE3 digest (the adapter's identity) and the smallest and largest value in it, which prove
every factor finite as a slot will hold it in one pass over the file (`FileChecks`): casting and
scaling by s are monotone, so no value leaves the dtype's range if the extremes do not, at any of
the config's scales. Only a file that fails that proof (or mixes dtypes) is checked tensor by
tensor, to name the tensor at fault.

Neither needs the file whole, so a source that streams it (S3Source) hands it to a `ParseAhead`:
its worker thread hashes the bytes and folds them into the extremes as they come, and the parse
that runs once the file is whole finds both done.

Why, on the dev box (Intel Xeon, 2 cores): a 29 MB adapter's parse copied the file, then scaled and
transposed B into new memory, then hashed the folded factors: 55-65 ms on a fresh thread, after a
~40 ms fetch from a loopback store and before its first request could run. Checking its 840 tensors
one by one costs ~40 ms of per-call overhead alone; the file's extremes take one pass.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import sys
import threading
from typing import NamedTuple

import numpy as np
import torch
from blake3 import blake3

from .safetensors_view import DTYPES, TensorSpan, header_size, layout, tensor_views, view

log = logging.getLogger(__name__)
_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
_MADV_POPULATE_WRITE = 23  # linux/mman.h
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


class FileFacts(NamedTuple):
    digest: bytes  # BLAKE3 of the file's bytes
    extremes: torch.Tensor | None  # [min, max] of its values, where every tensor has one float dtype


class FileChecks:
    """A weights file's tensors, digest and extremes, computed when asked."""

    def views(self, data) -> dict[str, torch.Tensor]:
        """Every tensor of `data` (a whole safetensors file) as a view; ValueError if it is broken."""
        return tensor_views(data)

    def facts(self, data, tensors: dict[str, torch.Tensor]) -> FileFacts:
        """The digest of `data` and its extremes (`tensors`: its views, which give its dtypes)."""
        dtype = _one_float_dtype({tensor.dtype for tensor in tensors.values()})
        return FileFacts(blake3(data).digest(), _extremes(_bytes_tensor(data), 0, len(data), dtype))


class ParseAhead(FileChecks):
    """The same facts of a weights file as it streams in. A source calls `start(size)` for the
    buffer to fill in order, then `arrived(n)` whenever its first n bytes are in (or `abandon()` if
    they never will be). A worker thread of its own works behind the download, so the download
    never waits on it; the parse's `facts` waits for what is left."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self._facts: FileFacts | None = None
        self._views: dict[str, torch.Tensor] | None = None
        self._ready = threading.Condition()
        self._worker: threading.Thread | None = None

    def start(self, size: int) -> torch.Tensor:
        """A new uint8 buffer for a weights file of `size` bytes (a retried download starts over)."""
        self.abandon()
        self.buffer = torch.empty(size, dtype=torch.uint8)  # pages arrive with the bytes, not zeroed first
        self._facts, self._views, self._arrived, self._abandoned = None, None, 0, False
        # A thread per file, ending with it: torch work must not run on a long-lived one (torch_threads.py).
        self._worker = threading.Thread(target=self._work, name="loraserve-parse-ahead", daemon=True)
        self._worker.start()
        return self.buffer

    def arrived(self, upto: int) -> None:
        """Bytes [0, upto) of the buffer are in."""
        with self._ready:
            self._arrived = upto
            self._ready.notify()

    def abandon(self) -> None:
        """The download failed: stop now, whatever has arrived."""
        with self._ready:
            self._abandoned = True
            self._ready.notify()
        self.finish()

    def finish(self) -> None:
        """Wait until the worker is done with the whole file (or abandoned it)."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def views(self, data) -> dict[str, torch.Tensor]:
        self.finish()
        return self._views if self._views is not None and self._holds(data) else super().views(data)

    def facts(self, data, tensors: dict[str, torch.Tensor]) -> FileFacts:
        self.finish()
        return self._facts if self._facts is not None and self._holds(data) else super().facts(data, tensors)

    def _holds(self, data) -> bool:
        """Whether `data` is this buffer, which nothing writes once its bytes are in."""
        return len(data) == self.buffer.numel() and _bytes_tensor(data).data_ptr() == self.buffer.data_ptr()

    def _work(self) -> None:
        try:
            self._facts = self._read_as_it_arrives()
        except Exception:  # noqa: BLE001 - never the download's failure: the parse reads the file itself
            log.warning("reading an adapter's weights as they arrived failed; the parse reads them", exc_info=True)

    def _read_as_it_arrives(self) -> FileFacts | None:
        _populate(self.buffer)
        data, hasher = memoryview(self.buffer.numpy()), blake3()
        done, checked, dtype, low, high = 0, None, None, math.inf, -math.inf
        while done < len(data):
            with self._ready:
                while self._arrived == done and not self._abandoned:
                    self._ready.wait()
                if self._abandoned:
                    return None
                upto = self._arrived
            hasher.update(data[done:upto])
            done = upto
            if checked is None:
                checked, spans = _header(data, done)
                if spans is not None:  # views need only the header
                    dtype = _one_float_dtype({DTYPES[span.dtype] for span in spans.values()})
                    self._views = _aligned_views(self.buffer, spans)
            if dtype is not None:  # the values that have arrived, whole elements only
                stop = checked + (done - checked) // dtype.itemsize * dtype.itemsize
                extremes = _extremes(self.buffer, checked, stop, dtype)
                if extremes is not None:
                    low, high = _merged(low, high, extremes)
                checked = stop
        extremes = None if dtype is None or low > high else torch.tensor([low, high], dtype=torch.float64).to(dtype)
        return FileFacts(hasher.digest(), extremes)


def _populate(buffer: torch.Tensor) -> None:
    """Map every page of a fresh buffer now, on this thread, while the download's own thread writes
    into it: those writes then find their pages mapped instead of faulting each in (7,000 faults,
    10-13 ms of a 29 MB download's thread on the dev box). MADV_POPULATE_WRITE (Linux 5.14) leaves
    the contents alone, so it is safe beside the writes; elsewhere it is a no-op."""
    if _LIBC is None:
        return
    page = mmap.PAGESIZE
    start = -(-buffer.data_ptr() // page) * page  # whole pages inside the buffer
    stop = (buffer.data_ptr() + buffer.numel()) // page * page
    if stop > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_POPULATE_WRITE)


def _header(data: memoryview, arrived: int) -> tuple[int | None, dict[str, TensorSpan] | None]:
    """Where a file's values start and its tensors' places, once its header has arrived ((None,
    None) before; spans None for a broken file, which the parse will name)."""
    try:
        start = header_size(data[:arrived])
        if start is None or start > arrived:
            return None, None
        return start, layout(data[:start], len(data))
    except ValueError:
        return len(data), None


def _aligned_views(buffer: torch.Tensor, spans: dict[str, TensorSpan]) -> dict[str, torch.Tensor] | None:
    """The file's tensors as views, before their bytes are in; None if a tensor sits where its
    dtype cannot view it (tensor_views copies those, and the copy needs the bytes)."""
    if any((buffer.data_ptr() + span.start) % DTYPES[span.dtype].itemsize for span in spans.values()):
        return None
    return {name: view(buffer, span) for name, span in spans.items()}


def _one_float_dtype(dtypes: set[torch.dtype]) -> torch.dtype | None:
    """The dtype of every tensor of a file when they share one float dtype (not fp8), else None."""
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    return dtype if dtype is not None and dtype.is_floating_point and dtype.itemsize >= 2 else None


def _extremes(buffer: torch.Tensor, start: int, stop: int, dtype: torch.dtype | None) -> torch.Tensor | None:
    """[min, max] of the values in bytes [start, stop) of the file (from its data section on when
    start is 0); NaN anywhere makes both NaN."""
    if dtype is None:
        return None
    start = max(start, header_size(memoryview(buffer.numpy())[:8]) or 0)
    if stop - start < dtype.itemsize or (buffer.data_ptr() + start) % dtype.itemsize:
        return None
    if dtype in _NUMPY:  # numpy's reductions run on this thread alone, beside the download's
        values = buffer.numpy()[start:stop].view(_NUMPY[dtype])
        return torch.tensor([values.min(), values.max()], dtype=dtype)
    return torch.stack(torch.aminmax(buffer[start:stop].view(dtype)))  # bfloat16: numpy has none


def _merged(low: float, high: float, extremes: torch.Tensor) -> tuple[float, float]:
    lo, hi = extremes.double().tolist()
    if math.isnan(lo) or math.isnan(low):
        return math.nan, math.nan
    return min(low, lo), max(high, hi)


def _bytes_tensor(data) -> torch.Tensor:
    return data if isinstance(data, torch.Tensor) else torch.frombuffer(data, dtype=torch.uint8)
