"""The base model's weights on transparent huge pages: each decode token streams every weight, and
on 4 KB pages that stream costs a TLB entry per 4 KB and stalls where the hardware prefetchers stop
at every page boundary.

Why: transformers maps the safetensors file, so the weights sit on the page cache's 4 KB pages, and
torch's allocator advises huge pages only under THP_MEM_ALLOC_ENABLE, only for what it allocates
after that is set, and not for a tensor's last partial 2 MB. Measured in one process on the Intel
Xeon dev box (2 cores, THP in `madvise` mode; the default model's 121 matmul weights, one row each,
interleaved): 20.9 GB/s on huge pages against 16.7 on 4 KB ones, and summing the same bytes 20.6
against 12.6. Where the system turned THP off the advice is a no-op and the move is a copy.
"""

from __future__ import annotations

import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
MIN_BYTES = 64 << 10  # smaller tensors (norms, biases) stay where they are: a few pages at most
AREA_BYTES = 32 << 20  # about this much a mapping: its tail on small pages is a few % of it, and
# weights that are dropped (an int8 base drops its full-precision W0s) unmap a few layers at a time
ALIGN = 64  # each tensor starts on a cache line


def move_weights_to_huge_pages(model: nn.Module) -> None:
    """Every CPU parameter of `model` of MIN_BYTES or more onto huge pages, in place: consecutive
    parameters share a mapping of about AREA_BYTES (tied parameters are one Parameter, moved once)."""
    params = [p for p in model.parameters() if p.device.type == "cpu" and p.nbytes >= MIN_BYTES]
    areas: list[list[nn.Parameter]] = [[]]
    for param in params:
        if areas[-1] and _span(areas[-1]) + param.nbytes > AREA_BYTES:
            areas.append([])
        areas[-1].append(param)
    for area in filter(None, areas):
        for param, copy in zip(area, huge_page_copies([p.data for p in area])):
            param.data = copy


def huge_page_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of CPU `tensors`, one after another (each on a cache line) in one mapping of huge pages."""
    flat, offset, copies = huge_page_bytes(_span(tensors)), 0, []
    for tensor in tensors:
        copies.append(flat[offset : offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor))
        offset += -(-tensor.nbytes // ALIGN) * ALIGN
    return copies


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of `nbytes` in its own private anonymous mapping, its whole
    2 MB blocks advised onto huge pages (the tail past the last whole block keeps small pages, so no
    huge page is left mostly empty). The mapping is unmapped with the last view of the tensor."""
    # private: a shared anonymous mapping is shmem, whose huge pages a separate setting governs
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -torch.frombuffer(area, dtype=torch.uint8, count=1).data_ptr() % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE") and nbytes >= HUGE_PAGE:  # before the first touch faults pages in
        area.madvise(mmap.MADV_HUGEPAGE, start, nbytes // HUGE_PAGE * HUGE_PAGE)
    return torch.frombuffer(area, dtype=torch.uint8, offset=start, count=nbytes)  # holds `area` open


def _span(tensors: list) -> int:
    return sum(-(-t.nbytes // ALIGN) * ALIGN for t in tensors)
