"""The base model's weights on huge pages (adapters/huge_pages.py), read back from the kernel's
own per-mapping report (/proc/self/smaps: THPeligible, set where the mapping was advised and the
system allows it), since whether a huge page is actually there depends on free memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from adapters import huge_pages
from adapters.huge_pages import AREA_BYTES, HUGE_PAGE, MIN_BYTES, huge_page_bytes, move_weights_to_huge_pages

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
pytestmark = pytest.mark.skipif(
    not THP_MODE.is_file() or "[never]" in THP_MODE.read_text(), reason="transparent huge pages are off here"
)  # (the tests read the file only where it exists: the mark short-circuits)


def _mapping(address: int) -> dict[str, str]:
    """The smaps fields of the mapping that holds `address`, with its range as 'range'."""
    fields, found = {}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if not head.endswith(":"):  # a mapping's first line: "lo-hi perms offset dev inode [path]"
            if found:
                break
            lo, hi = (int(part, 16) for part in head.split("-"))
            found = lo <= address < hi
            fields = {"range": (lo, hi)} if found else {}
        elif found:
            fields[head.rstrip(":")] = line.split()[1]
    return fields


def _mapped(address: int) -> bool:
    return bool(_mapping(address))


class Weights(nn.Module):
    """Parameters of the sizes a decoder holds: matmul weights of MBs, a norm of a few KB, one tied."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Parameter(torch.randn(3000, 1024))  # 12 MB
        self.norm = nn.Parameter(torch.randn(576))  # 2 KB: stays where it is
        self.layers = nn.ParameterList([nn.Parameter(torch.randn(1536, 1024)) for _ in range(8)])  # 6 MB each
        self.head = self.embed  # tied: one Parameter


def test_weights_move_onto_advised_mappings_with_their_values():
    model = Weights()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    norm_address = model.norm.data_ptr()
    move_weights_to_huge_pages(model)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert model.norm.data_ptr() == norm_address
    assert model.head is model.embed
    large = [p for p in model.parameters() if p.nbytes >= MIN_BYTES]
    for p in large:
        assert _mapping(p.data_ptr())["THPeligible"] == "1"
        assert p.data_ptr() % 64 == 0
    # consecutive weights share mappings of at most AREA_BYTES (one larger alone)
    areas = {_mapping(p.data_ptr())["range"] for p in large}
    assert 1 < len(areas) < len(large)
    assert all(hi - lo <= AREA_BYTES + HUGE_PAGE for lo, hi in areas)


def test_dropping_the_weights_of_a_mapping_unmaps_it():
    """An int8 base drops its full-precision W0s (adapters/layer.py): their memory must go with them."""
    model = Weights()
    move_weights_to_huge_pages(model)
    address = model.layers[3].data_ptr()
    sharing = [i for i, p in enumerate(model.layers) if _mapping(p.data_ptr())["range"] == _mapping(address)["range"]]
    assert len(sharing) > 1
    for i in sharing[:-1]:
        model.layers[i] = nn.Parameter(torch.zeros(1))
    assert _mapped(address), "unmapped while a weight still lives in it"
    model.layers[sharing[-1]] = nn.Parameter(torch.zeros(1))
    assert not _mapped(address)


@pytest.mark.skipif("[madvise]" not in THP_MODE.read_text(), reason="with THP `always` every mapping is eligible")
def test_only_whole_huge_pages_are_advised():
    """A mapping's tail past its last whole 2 MB block keeps small pages: no huge page mostly empty."""
    flat = huge_page_bytes(HUGE_PAGE + HUGE_PAGE // 2)
    assert flat.data_ptr() % HUGE_PAGE == 0
    assert _mapping(flat.data_ptr())["THPeligible"] == "1"
    tail = _mapping(flat.data_ptr() + HUGE_PAGE)
    assert tail["THPeligible"] == "0" and tail["range"][0] == flat.data_ptr() + HUGE_PAGE


def test_the_default_model_loads_onto_huge_pages(default_model):
    weights = [p for p in default_model.model.parameters() if p.nbytes >= huge_pages.MIN_BYTES]
    assert sum(p.nbytes for p in weights) > 0.99 * sum(p.nbytes for p in default_model.model.parameters())
    # each mapping's tail past its last whole 2 MB keeps small pages: a few % of the bytes
    advised = sum(p.nbytes for p in weights if _mapping(p.data_ptr())["THPeligible"] == "1")
    assert advised > 0.9 * sum(p.nbytes for p in weights)
