"""server.engine.model_loader: the embedded default model, the GGUF conversion cache, local HF directories,
and a ModelLoadError that says what is wrong for anything else."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from server.engine import model_loader
from server.engine.model_loader import ModelLoadError, load_base_model, resolve_model_dir

NOT_A_MODEL = "neither a .gguf file nor a directory with config.json"


@pytest.mark.real_model
def test_default_model_loads(default_model):
    model, tokenizer = default_model.model, default_model.tokenizer
    assert isinstance(model, LlamaForCausalLM) and default_model.name == "SmolLM2-135M-Instruct"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi there"}], tokenize=False, add_generation_prompt=True
    )
    assert "Hi there" in prompt and prompt != "Hi there"
    assert (default_model.path / "config.json").is_file()


@pytest.mark.real_model
def test_second_load_reuses_the_cache(default_model, monkeypatch):
    def convert_again(*args):
        raise AssertionError("the GGUF file was converted a second time")

    monkeypatch.setattr(model_loader, "_convert_gguf", convert_again)
    written = (default_model.path / "config.json").stat().st_mtime_ns
    again = load_base_model()
    assert again.path == default_model.path
    assert (again.path / "config.json").stat().st_mtime_ns == written
    assert torch.equal(again.model.model.embed_tokens.weight, default_model.model.model.embed_tokens.weight)


@pytest.mark.real_model
def test_loads_a_local_hf_directory(tiny_llama, default_model, tmp_path):
    directory = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(directory)
    default_model.tokenizer.save_pretrained(directory)
    loaded = load_base_model(directory, dtype=torch.bfloat16)
    assert isinstance(loaded.model, LlamaForCausalLM)
    assert (loaded.name, loaded.path) == ("tiny-llama", directory)
    assert loaded.model.config.hidden_size == 64 and not loaded.model.training
    expected = tiny_llama.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, expected[name].to(torch.bfloat16)), name


def test_gguf_is_converted_once_per_file_version(tmp_path, monkeypatch):
    conversions = []

    def fake_convert(gguf, out):
        conversions.append(gguf)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_loader, "_convert_gguf", fake_convert)
    gguf, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    gguf.write_bytes(b"GGUF" + bytes(16))
    directory, name = resolve_model_dir(gguf, cache)
    assert name == "tiny" and directory.parent == cache and (directory / "config.json").is_file()
    assert resolve_model_dir(gguf, cache) == (directory, "tiny") and len(conversions) == 1
    assert [p.name for p in cache.iterdir()] == [directory.name]  # no staging directory left behind

    gguf.write_bytes(b"GGUF" + bytes(32))  # a new file version gets its own entry
    assert resolve_model_dir(gguf, cache)[0] != directory and len(conversions) == 2


def text_file(tmp):
    (tmp / "weights.txt").write_text("hello")
    return tmp / "weights.txt"


def empty_dir(tmp):
    (tmp / "empty-dir").mkdir()
    return tmp / "empty-dir"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda tmp: tmp / "missing-model", id="nonexistent-path"),
        pytest.param(lambda tmp: tmp / "missing.gguf", id="nonexistent-gguf"),
        pytest.param(text_file, id="non-gguf-file"),
        pytest.param(empty_dir, id="dir-without-config"),
    ],
)
def test_not_a_model_is_a_clear_error(tmp_path, make):
    path = make(tmp_path)
    with pytest.raises(ModelLoadError, match=NOT_A_MODEL) as raised:
        load_base_model(path, cache_dir=tmp_path / "cache")
    assert str(path) in str(raised.value) and "local path" in str(raised.value)


def test_file_that_is_not_gguf_inside_is_a_clear_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"this is not a GGUF file at all" * 8)
    with pytest.raises(ModelLoadError, match="could not be read") as raised:
        load_base_model(fake, cache_dir=tmp_path / "cache")
    assert str(fake) in str(raised.value)
    assert list((tmp_path / "cache").iterdir()) == []  # no staging or half-written entry


@pytest.mark.real_model
def test_truncated_gguf_is_a_clear_error(tmp_path):
    truncated = tmp_path / "truncated.gguf"
    with model_loader.default_gguf_path().open("rb") as full:
        truncated.write_bytes(full.read(2_000_000))
    with pytest.raises(ModelLoadError, match="could not be read"):
        load_base_model(truncated, cache_dir=tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []
