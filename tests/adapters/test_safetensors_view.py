"""safetensors_view against the safetensors library itself: the same tensors from good files (as views
of the file's bytes, not copies), and a refusal wherever the library refuses a broken one."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load as library_load
from safetensors.torch import save as library_save

from adapters.safetensors_view import header_size, layout, tensor_views

TENSORS = {
    "a.lora_A.weight": torch.randn(4, 6),
    "a.lora_B.weight": torch.randn(5, 4, dtype=torch.float64),
    "half": torch.randn(3, 3, dtype=torch.float16),
    "brain": torch.randn(7, dtype=torch.bfloat16),
    "empty": torch.zeros(0, 3),
    "scalar": torch.tensor(2.5),
    "ints": torch.arange(5, dtype=torch.int32),
}


def test_views_equal_the_librarys_tensors_and_share_the_files_bytes():
    data = library_save(TENSORS, metadata={"format": "pt"})
    views, expected = tensor_views(data), library_load(data)
    assert views.keys() == expected.keys()
    base = torch.frombuffer(data, dtype=torch.uint8).data_ptr()
    for name, tensor in expected.items():
        assert views[name].dtype == tensor.dtype and views[name].shape == tensor.shape
        assert torch.equal(views[name], tensor), name
        if tensor.numel():
            assert base <= views[name].data_ptr() < base + len(data), f"{name} was copied"


def test_a_tensor_at_an_offset_its_dtype_cannot_view_is_copied_with_the_right_values():
    values = torch.arange(3, dtype=torch.float32)
    header = {"odd": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
              "f": {"dtype": "F32", "shape": [3], "data_offsets": [1, 13]}}  # fmt: skip
    data = _file(header, b"\x07" + values.numpy().tobytes())
    assert torch.equal(tensor_views(data)["f"], values) and torch.equal(library_load(data)["f"], values)


def test_a_file_arriving_is_laid_out_from_its_header_alone():
    data = library_save(TENSORS)
    end = header_size(data[:8])
    assert header_size(data[:7]) is None
    spans = layout(data[:end], len(data))
    assert min(span.start for span in spans.values()) == end and max(span.stop for span in spans.values()) == len(data)
    with pytest.raises(ValueError, match="ends inside its header"):
        layout(data[: end - 1], len(data))


def _file(header: dict, body: bytes, pad: bytes = b"") -> bytes:
    text = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(text)) + text + body


def _f32(shape, start, stop):
    return {"dtype": "F32", "shape": shape, "data_offsets": [start, stop]}


GOOD = library_save({"x": torch.ones(2, 2), "y": torch.ones(3)})
BROKEN = {
    "empty file": b"",
    "cut in its length": GOOD[:5],
    "header past the end": struct.pack("<Q", 10**6) + b"{}",
    "header not JSON": struct.pack("<Q", 8) + b"not json",
    "header a list": struct.pack("<Q", 2) + b"[]",
    "cut in its data": GOOD[:-3],
    "bytes past its tensors": GOOD + b"\0" * 4,
    "gap between tensors": _file({"x": _f32([1], 0, 4), "y": _f32([1], 8, 12)}, b"\0" * 12),
    "overlapping tensors": _file({"x": _f32([2], 0, 8), "y": _f32([1], 4, 8)}, b"\0" * 8),
    "size not its shape's": _file({"x": _f32([3], 0, 8)}, b"\0" * 8),
    "unknown dtype": _file({"x": {"dtype": "F17", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative shape": _file({"x": _f32([-1], 0, 4)}, b"\0" * 4),
    "offsets not a pair": _file({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
    "metadata not strings": _file({"__metadata__": {"k": 1}, "x": _f32([1], 0, 4)}, b"\0" * 4),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_broken_file_is_refused_as_the_library_refuses_it(case):
    data = BROKEN[case]
    with pytest.raises((SafetensorError, ValueError, RuntimeError)):
        library_load(data)
    with pytest.raises(ValueError):
        tensor_views(data)


def test_a_name_given_twice_is_refused():
    first, second = (json.dumps(_f32([1], start, start + 4)) for start in (0, 4))
    text = f'{{"x": {first}, "x": {second}}}'.encode()
    with pytest.raises(ValueError, match="twice"):
        tensor_views(struct.pack("<Q", len(text)) + text + b"\0" * 8)
