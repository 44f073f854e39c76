"""Every bad adapter is refused with the right typed error, a message naming the file and the field or
tensor, and a registry left exactly as it was. Sources are tried as upload dicts and as directories."""

from __future__ import annotations

import copy
import io
import json
import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from transformers import LlamaConfig, LlamaForCausalLM

from adapters import (
    AdapterNotFoundError,
    AdapterRegistry,
    IncompatibleAdapterError,
    InvalidAdapterError,
    UnsafeAdapterFormatError,
    UnsupportedAdapterError,
    wrap_model,
)

CONFIG, WEIGHTS, PICKLE = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PREFIX = "base_model.model."
Q_PROJ = "model.layers.0.self_attn.q_proj"
K_PROJ = "model.layers.0.self_attn.k_proj"


def adapter_files(config: dict, tensors: dict) -> dict[str, bytes]:
    return {CONFIG: json.dumps(config).encode(), WEIGHTS: save_safetensors(tensors)}


def read_files(path) -> SimpleNamespace:
    return SimpleNamespace(
        config=json.loads((path / CONFIG).read_text()), tensors=load_safetensors((path / WEIGHTS).read_bytes())
    )


@pytest.fixture(scope="module")
def adapters_on_disk(tiny_llama, tiny_gpt2, tmp_path_factory, make_peft_adapter):
    """The good adapter, plus well-formed ones that do not fit the tiny Llama with max_rank 16."""
    root = tmp_path_factory.mktemp("bad")
    wide_llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=128,
            hidden_size=96,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    return SimpleNamespace(
        good=read_files(
            make_peft_adapter(tiny_llama, root / "good", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        ),
        wide=read_files(make_peft_adapter(wide_llama, root / "wide", r=4, target_modules=["q_proj"])),
        high_rank=read_files(make_peft_adapter(tiny_llama, root / "r32", r=32, target_modules=["q_proj"])),
        gpt2=read_files(
            make_peft_adapter(tiny_gpt2, root / "gpt2", r=4, target_modules=["c_attn"], fan_in_fan_out=True)
        ),
    )


# Builders: take the adapters above, return a bad upload (file name -> bytes).
def config_change(**changes):
    return lambda a: adapter_files({**a.good.config, **changes}, a.good.tensors)


def tensors_change(edit):
    def build(a):
        tensors = {key: value.clone() for key, value in a.good.tensors.items()}
        edit(tensors)
        return adapter_files(a.good.config, tensors)

    return build


def file_change(**files):
    """Replace (bytes) or drop (None) whole files of the good adapter."""

    def build(a):
        merged = {**adapter_files(a.good.config, a.good.tensors), **files}
        return {name: data for name, data in merged.items() if data is not None}

    return build


def other(attr):
    return lambda a: adapter_files(getattr(a, attr).config, getattr(a, attr).tensors)


def pickle_only(a):
    buffer = io.BytesIO()
    torch.save(a.good.tensors, buffer)
    return {CONFIG: json.dumps(a.good.config).encode(), PICKLE: buffer.getvalue()}


def truncated_weights(a):
    return file_change(**{WEIGHTS: save_safetensors(a.good.tensors)[:-9]})(a)


def set_value(key, index, value):
    return tensors_change(lambda t: t[key].__setitem__(index, value))


def add_pair(module, a_shape, b_shape):
    def edit(tensors):
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(a_shape)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(b_shape)

    return tensors_change(edit)


def case(id, build, error, file, field, words):
    return pytest.param(build, error, file, field, words, id=id)


BAD_CASES = [
    case("missing-config", file_change(**{CONFIG: None}), InvalidAdapterError, CONFIG, None, "missing"),
    case(
        "malformed-json",
        file_change(**{CONFIG: b'{"r": 4, "target_modules": ['}),
        InvalidAdapterError,
        CONFIG,
        None,
        "JSON",
    ),
    case("config-not-an-object", file_change(**{CONFIG: b"[4]"}), InvalidAdapterError, CONFIG, None, "object"),
    case("r-not-an-int", config_change(r="x"), InvalidAdapterError, CONFIG, "r", "integer"),
    case(
        "target-modules-wrong-type", config_change(target_modules=5), InvalidAdapterError, CONFIG, "target_modules", ""
    ),
    case("missing-weights", file_change(**{WEIGHTS: None}), InvalidAdapterError, WEIGHTS, None, "missing"),
    case("only-pickle-weights", pickle_only, UnsafeAdapterFormatError, PICKLE, None, "safetensors"),
    case(
        "garbage-safetensors",
        file_change(**{WEIGHTS: b"\x07garbage, not safetensors" * 4}),
        InvalidAdapterError,
        WEIGHTS,
        None,
        "safetensors",
    ),
    case("truncated-safetensors", truncated_weights, InvalidAdapterError, WEIGHTS, None, "safetensors"),
    case(
        "no-lora-tensors",
        file_change(**{WEIGHTS: save_safetensors({})}),
        InvalidAdapterError,
        WEIGHTS,
        None,
        "no LoRA tensors",
    ),
    case(
        "missing-lora-B",
        tensors_change(lambda t: t.pop(f"{PREFIX}{Q_PROJ}.lora_B.weight")),
        InvalidAdapterError,
        WEIGHTS,
        f"{Q_PROJ}.lora_B.weight",
        "missing",
    ),
    case(
        "extra-unknown-tensor",
        tensors_change(lambda t: t.update({f"{PREFIX}{Q_PROJ}.magnitude": torch.ones(64)})),
        InvalidAdapterError,
        WEIGHTS,
        f"{PREFIX}{Q_PROJ}.magnitude",
        "unexpected tensor",
    ),
    case(
        "extra-untargeted-lora-pair",
        add_pair(K_PROJ, (4, 64), (32, 4)),
        InvalidAdapterError,
        WEIGHTS,
        f"{K_PROJ}.lora_A.weight",
        "target_modules",
    ),
    case(
        "lora-pair-for-module-base-lacks",
        add_pair("model.layers.0.self_attn.qkv_proj", (4, 64), (64, 4)),
        IncompatibleAdapterError,
        WEIGHTS,
        "model.layers.0.self_attn.qkv_proj.lora_A.weight",
        "no module",
    ),
    case("rank-disagrees-with-config-r", config_change(r=8), InvalidAdapterError, CONFIG, "r", "rank 4"),
    case(
        "rank-disagrees-with-rank-pattern",
        config_change(rank_pattern={"v_proj": 2}),
        InvalidAdapterError,
        CONFIG,
        "rank_pattern",
        "rank 4",
    ),
    case(
        "a-and-b-ranks-disagree",
        tensors_change(lambda t: t.update({f"{PREFIX}{Q_PROJ}.lora_B.weight": torch.randn(64, 3)})),
        InvalidAdapterError,
        WEIGHTS,
        f"{Q_PROJ}.lora_A.weight",
        "rank-r pair",
    ),
    case(
        "shapes-from-another-hidden-size",
        other("wide"),
        IncompatibleAdapterError,
        WEIGHTS,
        f"{Q_PROJ}.lora_A.weight",
        "do not fit",
    ),
    case(
        "target-module-base-lacks",
        config_change(target_modules=["q_proj", "v_proj", "c_attn"]),
        IncompatibleAdapterError,
        CONFIG,
        "target_modules",
        "c_attn",
    ),
    case("gpt2-adapter-on-llama", other("gpt2"), IncompatibleAdapterError, CONFIG, "target_modules", "c_attn"),
    case(
        "nan-in-lora-A",
        set_value(f"{PREFIX}{Q_PROJ}.lora_A.weight", (1, 2), float("nan")),
        InvalidAdapterError,
        WEIGHTS,
        f"{Q_PROJ}.lora_A.weight",
        "NaN",
    ),
    case(
        "inf-in-lora-B",
        set_value(f"{PREFIX}{Q_PROJ}.lora_B.weight", (3, 0), float("-inf")),
        InvalidAdapterError,
        WEIGHTS,
        f"{Q_PROJ}.lora_B.weight",
        "Inf",
    ),
    case("rank-above-max-rank", other("high_rank"), UnsupportedAdapterError, CONFIG, "r", "max_lora_rank"),
    case(
        "use-dora-without-magnitudes",
        config_change(use_dora=True),
        InvalidAdapterError,
        WEIGHTS,
        f"{Q_PROJ}.lora_magnitude_vector",
        "missing",
    ),
    case(
        "magnitude-without-use-dora",
        tensors_change(lambda t: t.update({f"{PREFIX}{Q_PROJ}.lora_magnitude_vector": torch.ones(64)})),
        InvalidAdapterError,
        CONFIG,
        "use_dora",
        "does not set",
    ),
    case(
        "lora-bias-without-biases",
        config_change(lora_bias=True),
        InvalidAdapterError,
        WEIGHTS,
        f"{Q_PROJ}.lora_B.bias",
        "missing",
    ),
    case(
        "modules-to-save-not-per-row",  # an attention block's rows depend on each other
        lambda a: adapter_files(
            {**a.good.config, "modules_to_save": ["self_attn"]},
            {**a.good.tensors, f"{PREFIX}{K_PROJ}.weight": torch.ones(64, 64)},
        ),
        UnsupportedAdapterError,
        CONFIG,
        "modules_to_save",
        "cannot be served per row",
    ),
    case(
        "modules-to-save-unselected",
        tensors_change(lambda t: t.update({f"{PREFIX}model.norm.weight": torch.ones(64)})),
        InvalidAdapterError,
        WEIGHTS,
        f"{PREFIX}model.norm.weight",
        "unexpected tensor",
    ),
    case("lora-bias", config_change(bias="all"), UnsupportedAdapterError, CONFIG, "bias", "not supported"),
    case("not-lora", config_change(peft_type="IA3"), UnsupportedAdapterError, CONFIG, "peft_type", "IA3"),
]


@pytest.fixture
def registry(tiny_llama, adapters_on_disk):
    """A registry already serving `good` from slot 0; slot 1 is free."""
    registry = AdapterRegistry(wrap_model(copy.deepcopy(tiny_llama), max_loras=2, max_rank=16))
    registry.add("good", adapter_files(adapters_on_disk.good.config, adapters_on_disk.good.tensors))
    registry.release(registry.acquire("good"))
    return registry


def snapshot(registry):
    layers = registry.lora_model.layers.values()
    return dict(
        list=registry.list(),
        resident=registry.resident(),
        host=registry.host_cached(),
        counts=(len(registry), registry.num_loads, registry.num_evictions),
        slot_ranks=list(registry.lora_model.slot_ranks),
        buffers=[(layer.lora_a.clone(), layer.lora_b.clone()) for layer in layers if layer.lora_a is not None],
    )


def assert_unchanged(registry, before, name):
    after = snapshot(registry)
    assert name not in registry
    with pytest.raises(AdapterNotFoundError):
        registry.info(name)
    assert {k: v for k, v in after.items() if k != "buffers"} == {k: v for k, v in before.items() if k != "buffers"}
    assert len(after["buffers"]) == len(before["buffers"])
    assert all(
        torch.equal(x, y)
        for pair_after, pair_before in zip(after["buffers"], before["buffers"])
        for x, y in zip(pair_after, pair_before)
    )


def as_source(files: dict[str, bytes], kind: str, tmp_path):
    if kind == "upload":
        return files
    directory = tmp_path / "adapter"
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def assert_names(error, file, field, words):
    message = str(error)
    assert error.file == file
    # A union field's location may carry pydantic's member tag ("target_modules.list[str]").
    assert message.startswith(f"{file}: {field}" if field else f"{file}: "), message
    assert words in message, message


@pytest.mark.parametrize("kind", ["upload", "directory"])
def test_unchanged_good_adapter_is_accepted(registry, adapters_on_disk, tmp_path, kind):
    """The control for the cases below: the builders' starting point loads in both source forms."""
    registry.add("copy", as_source(file_change()(adapters_on_disk), kind, tmp_path))
    assert registry.info("copy").target_modules == registry.info("good").target_modules


@pytest.mark.parametrize("kind", ["upload", "directory"])
@pytest.mark.parametrize("build, error, file, field, words", BAD_CASES)
def test_bad_adapter_is_refused(registry, adapters_on_disk, tmp_path, kind, build, error, file, field, words):
    source = as_source(build(adapters_on_disk), kind, tmp_path)
    before = snapshot(registry)
    with pytest.raises(error) as raised:
        registry.add("bad", source)
    assert type(raised.value) is error
    assert_names(raised.value, file, field, words)
    assert_unchanged(registry, before, "bad")


def test_missing_directory_is_refused(registry, tmp_path):
    before = snapshot(registry)
    with pytest.raises(InvalidAdapterError, match="nowhere.*does not exist"):
        registry.add("bad", tmp_path / "nowhere")
    assert_unchanged(registry, before, "bad")


@pytest.mark.parametrize("where", ["directory", "parent"])
def test_a_path_the_filesystem_cannot_hold_is_refused_not_a_crash(registry, tmp_path, where):
    """A component past NAME_MAX raises ENAMETOOLONG from the first stat: an OSError that reached
    the HTTP layer as a 500 before it was an InvalidAdapterError (a 400)."""
    too_long = "a" * 300
    source = tmp_path / too_long if where == "directory" else tmp_path / too_long / "adapter"
    before = snapshot(registry)
    with pytest.raises(InvalidAdapterError, match="cannot be read"):
        registry.add("bad", source)
    assert_unchanged(registry, before, "bad")


def test_weights_overflowing_the_serving_dtype_are_refused(tiny_llama, adapters_on_disk):
    """Finite in fp32 but inf once cast to an fp16 base: refused at load, not garbage at serve time."""
    huge = {key: value * 1e6 if ".lora_B." in key else value for key, value in adapters_on_disk.good.tensors.items()}
    files = adapter_files(adapters_on_disk.good.config, huge)
    AdapterRegistry(wrap_model(copy.deepcopy(tiny_llama), max_rank=16)).add("fine-in-fp32", files)
    registry = AdapterRegistry(wrap_model(copy.deepcopy(tiny_llama).half(), max_rank=16))
    before = snapshot(registry)
    with pytest.raises(InvalidAdapterError) as raised:
        registry.add("bad", files)
    assert_names(raised.value, WEIGHTS, f"{Q_PROJ}.lora_B.weight", "float16")
    assert_unchanged(registry, before, "bad")


@pytest.mark.parametrize(
    "build",
    [
        config_change(r=8),
        set_value(f"{PREFIX}{Q_PROJ}.lora_A.weight", (0, 0), float("nan")),
        file_change(**{WEIGHTS: None}),
    ],
    ids=["rank-mismatch", "nan", "missing-weights"],
)
def test_failed_replace_keeps_the_old_adapter(registry, adapters_on_disk, token_ids, build):
    lora_model = registry.lora_model
    slot = registry.acquire("good").slot
    token_slots = torch.full((token_ids.numel(),), slot)
    with torch.no_grad(), lora_model.gather(lora_model.build_batch(token_slots)):
        expected = lora_model.model(token_ids).logits
    info = registry.info("good")

    with pytest.raises(InvalidAdapterError):
        registry.add("good", build(adapters_on_disk), replace=True)
    assert registry.info("good") == info and registry.resident() == ["good", None]
    assert registry.acquire("good").slot == slot
    with torch.no_grad(), lora_model.gather(lora_model.build_batch(token_slots)):
        assert torch.equal(lora_model.model(token_ids).logits, expected)


def _named_base(tiny_llama, name):
    model = copy.deepcopy(tiny_llama)
    model.config.name_or_path = name
    return AdapterRegistry(wrap_model(model, max_rank=16))


@pytest.mark.parametrize("trained_on, warns", [("org/other-model", True), ("org/tiny-llama", False), (None, False)])
def test_other_base_model_name_is_only_a_warning(tiny_llama, adapters_on_disk, caplog, trained_on, warns):
    registry = _named_base(tiny_llama, "org/tiny-llama")
    config = {**adapters_on_disk.good.config, "base_model_name_or_path": trained_on}
    with caplog.at_level(logging.WARNING, logger="adapters"):
        registry.add("a", adapter_files(config, adapters_on_disk.good.tensors))
    assert "a" in registry
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if warns:
        assert len(warnings) == 1 and "org/other-model" in warnings[0] and "org/tiny-llama" in warnings[0]
    else:
        assert warnings == []
