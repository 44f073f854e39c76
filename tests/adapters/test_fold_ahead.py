"""FoldAhead: an adapter's weights folded while they arrive give the very parse a whole file gives,
with nothing folded twice, and a stream that is broken, retried or unrelated changes no parse."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load as library_load
from safetensors.torch import save as library_save

from adapters import InvalidAdapterError, wrap_model
from adapters.fold_ahead import FoldAhead
from adapters.peft_format import fold_ahead, load_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def lora_model(tiny_llama):
    return wrap_model(copy.deepcopy(tiny_llama), max_loras=2, max_rank=16)


@pytest.fixture(scope="module")
def files(tiny_llama, tmp_path_factory, make_peft_adapter):
    """Two adapters on every linear, scales varying per module (rank_pattern, alpha_pattern)."""
    root = tmp_path_factory.mktemp("fold_ahead")
    made = {}
    for name, r in (("one", 8), ("two", 6)):
        path = make_peft_adapter(
            tiny_llama, root / name, r=r, lora_alpha=16, target_modules="all-linear",
            rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 3},
        )  # fmt: skip
        made[name] = {f: (path / f).read_bytes() for f in (CONFIG, WEIGHTS)}
    return made


def stream(files: dict[str, bytes], ahead: FoldAhead, piece: int) -> dict:
    """`files` as a streaming source hands them over: the weights into `ahead`, `piece` bytes at a time."""
    weights = files[WEIGHTS]
    ahead.configure(files[CONFIG])
    buffer = ahead.start(len(weights))
    for start in range(0, len(weights), piece):
        stop = min(start + piece, len(weights))
        buffer[start:stop] = torch.frombuffer(weights[start:stop], dtype=torch.uint8)
        ahead.arrived(stop)
    ahead.finish()
    return {CONFIG: files[CONFIG], WEIGHTS: memoryview(buffer.numpy())}


def parse(lora_model, files, dtype, folds=None):
    return load_adapter("x", files, lora_model.spec, max_rank=16, dtype=dtype, folds=folds)


def assert_same_parse(parsed, plain):
    assert parsed.weights.keys() == plain.weights.keys() and parsed.identity == plain.identity
    for module, weights in plain.weights.items():
        for part, tensor in zip(weights._fields, weights):
            other = getattr(parsed.weights[module], part)
            assert (other is None) == (tensor is None)
            assert tensor is None or (other.dtype == tensor.dtype and torch.equal(other, tensor)), (module, part)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("piece", [777, 1 << 20])
def test_folding_ahead_gives_the_same_parse_and_leaves_it_nothing_to_fold(lora_model, files, dtype, piece):
    ahead = fold_ahead(dtype)
    streamed = stream(files["one"], ahead, piece)
    folded = ahead.num_folded
    assert folded == 2 * len(parse(lora_model, files["one"], dtype).weights)  # every A and B, at its scale
    assert_same_parse(parse(lora_model, streamed, dtype, ahead), parse(lora_model, files["one"], dtype))
    assert ahead.num_folded == folded  # the parse found each fold done: it computed none again


def test_a_parse_of_other_bytes_uses_nothing_folded_ahead(lora_model, files):
    ahead = fold_ahead(torch.float32)
    stream(files["one"], ahead, 4096)
    assert_same_parse(
        parse(lora_model, files["two"], torch.float32, ahead), parse(lora_model, files["two"], torch.float32)
    )


def test_a_retried_stream_starts_over(lora_model, files):
    ahead = fold_ahead(torch.float32)
    stream(files["one"], ahead, 4096)
    streamed = stream(files["two"], ahead, 4096)
    assert_same_parse(parse(lora_model, streamed, torch.float32, ahead), parse(lora_model, files["two"], torch.float32))


def _with_nan_b(files: dict[str, bytes]) -> dict[str, bytes]:
    tensors = library_load(files[WEIGHTS])
    key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[key][1, 0] = float("nan")
    return {**files, WEIGHTS: library_save(tensors)}


@pytest.mark.parametrize("broken", ["garbage", "cut short", "nan", "config"])
def test_a_broken_stream_is_named_by_the_parse_as_without_folding_ahead(lora_model, files, broken):
    bad = {
        "garbage": {**files["one"], WEIGHTS: b"\x07 not safetensors" * 100},
        "cut short": {**files["one"], WEIGHTS: files["one"][WEIGHTS][:-100]},
        "nan": _with_nan_b(files["one"]),
        "config": {**files["one"], CONFIG: b"{not json"},
    }[broken]
    with pytest.raises(InvalidAdapterError) as plain:
        parse(lora_model, bad, torch.float32)
    ahead = fold_ahead(torch.float32)
    streamed = stream(bad, ahead, 1000)  # never raises: the work ahead just stops
    with pytest.raises(InvalidAdapterError) as folded:
        parse(lora_model, streamed, torch.float32, ahead)
    assert str(folded.value) == str(plain.value)
