"""Settings reach the engine: every EngineConfig knob that is also a setting is passed through."""
from __future__ import annotations

import argparse

import pytest

from server.engine.config import EngineConfig
from server.http.cli import _add_settings_flags
from server.http.settings import Settings


def test_every_shared_knob_reaches_the_engine_config():
    shared = [name for name in EngineConfig.model_fields if name in Settings.model_fields]
    assert {"max_loras", "max_lora_rank", "max_num_seqs", "kv_cache_tokens", "pack_weights"} <= set(shared)
    defaults = EngineConfig()
    changed = {name: (not value) if isinstance(value, bool) else (value or 8) * 2  # doubling keeps block_size legal
               for name, value in ((n, getattr(defaults, n)) for n in shared)}
    config = Settings(**changed).engine_config()
    assert {name: getattr(config, name) for name in shared} == changed


def test_pack_weights_is_on_by_default_and_off_from_the_environment(monkeypatch):
    assert Settings().engine_config().pack_weights is True
    monkeypatch.setenv("LORASERVE_PACK_WEIGHTS", "false")
    assert Settings().engine_config().pack_weights is False


def serve_flags(*argv: str) -> EngineConfig:
    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    return Settings(**vars(parser.parse_args(list(argv)))).engine_config()


def test_prefix_caching_is_on_by_default_with_vllms_flags():
    config = serve_flags()
    assert (config.enable_prefix_caching, config.block_size) == (True, 16)
    assert serve_flags("--no-enable-prefix-caching").enable_prefix_caching is False
    assert serve_flags("--enable-prefix-caching", "--block-size", "32").block_size == 32


def test_block_size_must_be_whole_kv_pages():
    with pytest.raises(ValueError):
        Settings(block_size=24)
