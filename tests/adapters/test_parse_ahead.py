"""ParseAhead: what a parse reads of a weights file (its digest, its extremes), read while the file
arrives, gives the very parse a whole file gives without reading it again; a stream that is broken,
retried or unrelated changes no parse. And the finite check that the extremes stand for."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load as library_load
from safetensors.torch import save as library_save

import adapters.parse_ahead
from adapters import InvalidAdapterError, wrap_model
from adapters.factor_values import loads_finite, slot_values
from adapters.parse_ahead import FileChecks, ParseAhead
from adapters.peft_format import load_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@pytest.fixture(scope="module")
def lora_model(tiny_llama):
    return wrap_model(copy.deepcopy(tiny_llama), max_loras=2, max_rank=16)


@pytest.fixture(scope="module")
def files(tiny_llama, tmp_path_factory, make_peft_adapter):
    """Two adapters on every linear, scales varying per module (rank_pattern, alpha_pattern)."""
    root = tmp_path_factory.mktemp("parse_ahead")
    made = {}
    for name, r in (("one", 8), ("two", 6)):
        path = make_peft_adapter(
            tiny_llama, root / name, r=r, lora_alpha=16, target_modules="all-linear",
            rank_pattern={"q_proj": 4}, alpha_pattern={"v_proj": 3},
        )  # fmt: skip
        made[name] = {f: (path / f).read_bytes() for f in (CONFIG, WEIGHTS)}
    return made


def stream(files: dict[str, bytes], ahead: ParseAhead, piece: int) -> dict:
    """`files` as a streaming source hands them over: the weights into `ahead`, `piece` bytes at a time."""
    weights = files[WEIGHTS]
    buffer = ahead.start(len(weights))
    for start in range(0, len(weights), piece):
        stop = min(start + piece, len(weights))
        buffer[start:stop] = torch.frombuffer(weights[start:stop], dtype=torch.uint8)
        ahead.arrived(stop)
    ahead.finish()
    return {CONFIG: files[CONFIG], WEIGHTS: memoryview(buffer.numpy())}


def facts_of(checks: FileChecks, data):
    return checks.facts(data, checks.views(data))


def parse(lora_model, files, dtype=torch.float32, checks=None):
    return load_adapter("x", files, lora_model.spec, max_rank=16, dtype=dtype, checks=checks)


def assert_same_parse(parsed, plain):
    assert parsed.weights.keys() == plain.weights.keys() and parsed.identity == plain.identity
    for module, weights in plain.weights.items():
        assert parsed.weights[module].scale == weights.scale
        for part in ("a", "b", "bias", "magnitude"):
            tensor, other = getattr(weights, part), getattr(parsed.weights[module], part)
            assert (other is None) == (tensor is None)
            assert tensor is None or (other.dtype == tensor.dtype and torch.equal(other, tensor)), (module, part)


def as_dtype(files: dict[str, bytes], dtype: torch.dtype) -> dict[str, bytes]:
    return {**files, WEIGHTS: library_save({k: v.to(dtype) for k, v in library_load(files[WEIGHTS]).items()})}


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("piece", [777, 1 << 20])
def test_what_was_read_ahead_gives_the_same_parse_without_reading_the_file_again(
    lora_model, files, monkeypatch, file_dtype, piece
):
    source = as_dtype(files["one"], file_dtype)
    ahead = ParseAhead()
    streamed = stream(source, ahead, piece)
    plain = parse(lora_model, source)
    monkeypatch.setattr(adapters.parse_ahead, "blake3", None)  # the parse below may not hash,
    monkeypatch.setattr(adapters.parse_ahead, "_extremes", None)  # scan the values,
    monkeypatch.setattr(adapters.parse_ahead, "tensor_views", None)  # nor read the header again
    assert_same_parse(parse(lora_model, streamed, checks=ahead), plain)


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_files_facts_are_its_digest_and_the_extremes_of_all_its_values(files, file_dtype):
    source = as_dtype(files["one"], file_dtype)
    values = torch.cat([t.flatten() for t in library_load(source[WEIGHTS]).values()])
    for facts in (facts_of(FileChecks(), source[WEIGHTS]), facts_of(ParseAhead(), source[WEIGHTS])):
        assert facts.digest == facts_of(FileChecks(), bytes(source[WEIGHTS])).digest
        assert facts.extremes.dtype == file_dtype
        assert facts.extremes.tolist() == [values.min().item(), values.max().item()]
    ahead = ParseAhead()
    stream(source, ahead, 1000)
    assert facts_of(ahead, ahead.buffer.numpy()).extremes.tolist() == [values.min().item(), values.max().item()]


def test_a_file_of_mixed_dtypes_has_no_extremes_and_is_checked_tensor_by_tensor(lora_model, files):
    tensors = library_load(files["one"][WEIGHTS])
    key = sorted(tensors)[0]
    mixed = {**files["one"], WEIGHTS: library_save({**tensors, key: tensors[key].half()})}
    assert facts_of(FileChecks(), mixed[WEIGHTS]).extremes is None
    ahead = ParseAhead()
    assert_same_parse(parse(lora_model, stream(mixed, ahead, 999), checks=ahead), parse(lora_model, mixed))


def test_a_parse_of_other_bytes_uses_nothing_read_ahead(lora_model, files):
    ahead = ParseAhead()
    stream(files["one"], ahead, 4096)
    assert_same_parse(parse(lora_model, files["two"], checks=ahead), parse(lora_model, files["two"]))


def test_a_retried_stream_starts_over(lora_model, files):
    ahead = ParseAhead()
    stream(files["one"], ahead, 4096)
    streamed = stream(files["two"], ahead, 4096)
    assert_same_parse(parse(lora_model, streamed, checks=ahead), parse(lora_model, files["two"]))


def _with_nan_b(files: dict[str, bytes]) -> dict[str, bytes]:
    tensors = library_load(files[WEIGHTS])
    key = sorted(k for k in tensors if "lora_B" in k)[3]
    tensors[key][1, 0] = float("nan")
    return {**files, WEIGHTS: library_save(tensors)}


@pytest.mark.parametrize("broken", ["garbage", "cut short", "nan", "config"])
def test_a_broken_stream_is_named_by_the_parse_as_without_reading_ahead(lora_model, files, broken):
    bad = {
        "garbage": {**files["one"], WEIGHTS: b"\x07 not safetensors" * 100},
        "cut short": {**files["one"], WEIGHTS: files["one"][WEIGHTS][:-100]},
        "nan": _with_nan_b(files["one"]),
        "config": {**files["one"], CONFIG: b"{not json"},
    }[broken]
    with pytest.raises(InvalidAdapterError) as plain:
        parse(lora_model, bad)
    ahead = ParseAhead()
    streamed = stream(bad, ahead, 1000)  # never raises: the work ahead just stops
    with pytest.raises(InvalidAdapterError) as read_ahead:
        parse(lora_model, streamed, checks=ahead)
    assert str(read_ahead.value) == str(plain.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_check_of_a_factor_equals_checking_every_value_the_slot_will_hold(dtype):
    """loads_finite reads only a factor's extremes: scaling by s (either sign) and casting are
    monotone, so it must agree with the elementwise check of the values a slot holds."""
    generator = torch.Generator().manual_seed(0)
    limit = torch.finfo(dtype).max
    for case in range(300):
        tensor = torch.randn(7, 5, generator=generator) * limit / 4
        tensor.view(-1)[case % 35] = [limit, -limit * 0.999, float("nan"), float("-inf"), 1.0][case % 5]
        scale = [1.0, 0.5, 2.0, -3.0, 1.0001, 0.0][case % 6]
        slot = slot_values(tensor, scale, dtype)
        assert loads_finite(tensor, scale, dtype) == bool(torch.isfinite(slot).all()), (case, scale)


@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_a_factor_finite_in_the_file_but_not_in_the_slot_is_refused_naming_it(lora_model, files, factor):
    """fp16 tops out at 65504: a float32 value above it (A cast, or B times its alpha/r) is a 422,
    naming the tensor, though the file's extremes were all the parse first looked at."""
    tensors = library_load(files["one"][WEIGHTS])
    key = sorted(k for k in tensors if f".{factor}." in k and "v_proj" in k)[0]
    tensors[key][0, 0] = 60000.0  # below fp16's max; times v_proj's scale 3/8 still is, A is not scaled
    tensors[key][0, 1] = 70000.0 if factor == "lora_A" else 180000.0  # over it once cast (A) or scaled (B)
    bad = {**files["one"], WEIGHTS: library_save(tensors)}
    for checks in (None, ParseAhead()):
        source = bad if checks is None else stream(bad, checks, 1000)
        with pytest.raises(InvalidAdapterError, match="overflows torch.float16") as error:
            parse(lora_model, source, torch.float16, checks)
        assert key == f"base_model.model.{error.value.field}"
