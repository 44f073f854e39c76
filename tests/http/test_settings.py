"""Settings reach the engine: every EngineConfig knob that is also a setting is passed through."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

import pytest

from server.engine.config import EngineConfig
from server.http.cli import _add_settings_flags
from server.http.settings import Settings


def test_every_shared_knob_reaches_the_engine_config():
    shared = [name for name in EngineConfig.model_fields if name in Settings.model_fields]
    assert {"max_loras", "max_lora_rank", "max_num_seqs", "kv_cache_tokens", "kernel_choice"} <= set(shared)
    defaults = EngineConfig()
    changed = {name: _changed(name, getattr(defaults, name)) for name in shared}
    config = Settings(**changed).engine_config()
    assert {name: getattr(config, name) for name in shared} == changed


def _changed(name: str, value):
    """Another legal value for an EngineConfig field."""
    annotation = EngineConfig.model_fields[name].annotation
    if typing.get_origin(annotation) is typing.Literal:
        return next(choice for choice in typing.get_args(annotation) if choice != value)
    if name == "cache_dir":
        return Path("/tmp/elsewhere")
    if name == "gpu_memory_utilization":
        return value / 2
    return (not value) if isinstance(value, bool) else (value or 8) * 2  # doubling keeps block_size legal


def test_kernel_choice_is_auto_by_default_and_plain_from_the_environment(monkeypatch):
    assert Settings().engine_config().kernel_choice == "auto"
    monkeypatch.setenv("LORASERVE_KERNEL_CHOICE", "plain")
    assert Settings().engine_config().kernel_choice == "plain"
    assert "pack_weights" not in Settings.model_fields  # one setting for the base kernels


def test_a_server_measures_the_compiled_step_and_enforce_eager_is_a_flag(monkeypatch):
    # A server keeps the compiled one-stream step where it measures faster on its CPU; the engine
    # alone (scripts, tests) stays eager, as the compile costs tens of seconds a model.
    monkeypatch.delenv("LORASERVE_COMPILE_DECODE", raising=False)  # tests/conftest.py turns it off
    assert Settings().engine_config().compile_decode == "auto" and EngineConfig().compile_decode == "off"
    assert serve_flags("--compile-decode", "on").compile_decode == "on"
    assert serve_flags("--enforce-eager").enforce_eager is True


def serve_flags(*argv: str) -> EngineConfig:
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    return Settings(**vars(parser.parse_args(list(argv)))).engine_config()


def test_prefix_caching_is_on_by_default_with_vllms_flags():
    config = serve_flags()
    assert (config.enable_prefix_caching, config.block_size) == (True, 16)
    assert serve_flags("--no-enable-prefix-caching").enable_prefix_caching is False
    assert serve_flags("--enable-prefix-caching", "--block-size", "32").block_size == 32


def test_memory_flags_take_sizes_and_shares():
    config = serve_flags("--memory-budget", "8GiB", "--merge-memory", "512MiB", "--gpu-memory-utilization", "0.5")
    assert (config.memory_budget, config.merge_memory, config.gpu_memory_utilization) == (8 * 2**30, 512 * 2**20, 0.5)
    defaults = serve_flags()
    assert (defaults.memory_budget, defaults.merge_memory, defaults.kv_cache_tokens) == (None, None, None)
    for bad in ({"gpu_memory_utilization": 1.5}, {"merge_memory": "lots"}, {"dtype": "float64"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Settings(**bad)


def test_block_size_must_be_whole_kv_pages():
    with pytest.raises(ValueError):
        Settings(block_size=24)


def test_quantization_and_kernel_choice_defaults_and_bad_values_name_the_field(monkeypatch):
    config = serve_flags()
    assert (config.quantization, config.kernel_choice) == ("none", "auto")  # the engine alone defaults to packed
    assert serve_flags("--quantization", "int8", "--kernel-choice", "plain").quantization == "int8"
    monkeypatch.setenv("LORASERVE_QUANTIZATION", "int4")
    with pytest.raises(ValueError, match="quantization"):
        Settings()
    with pytest.raises(SystemExit):
        serve_flags("--quantization", "int4")  # argparse: "invalid choice: 'int4' (choose from 'none', 'int8')"


def test_a_bad_environment_value_stops_serve_with_the_field_named(monkeypatch, capsys):
    from server.http.cli import main

    monkeypatch.setenv("LORASERVE_KERNEL_CHOICE", "fastest")
    assert main(["serve"]) == 2
    assert "kernel_choice" in capsys.readouterr().err


def test_engine_knobs_are_declared_once_and_policy_knobs_are_not_settings():
    from server.engine.config import EngineSettings

    assert set(EngineSettings.model_fields) <= set(Settings.model_fields)
    redeclared = set(Settings.__annotations__) & set(EngineSettings.model_fields)
    assert redeclared == {"kernel_choice", "compile_decode"}  # the knobs whose server default differs
    assert Settings().kernel_choice == "auto" and EngineConfig().kernel_choice == "packed"
    assert not {"merge_after_steps", "max_bypass_steps"} & set(Settings.model_fields)


def test_an_inherited_engine_knob_is_still_a_flat_environment_variable(monkeypatch):
    monkeypatch.setenv("LORASERVE_MAX_LORAS", "7")
    assert Settings().engine_config().max_loras == 7
    assert serve_flags("--max-loras", "3").max_loras == 3
