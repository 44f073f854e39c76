"""Settings reach the engine: every EngineConfig knob that is also a setting is passed through."""
from __future__ import annotations

from server.engine.config import EngineConfig
from server.http.settings import Settings


def test_every_shared_knob_reaches_the_engine_config():
    shared = [name for name in EngineConfig.model_fields if name in Settings.model_fields]
    assert {"max_loras", "max_lora_rank", "max_num_seqs", "kv_cache_tokens", "pack_weights"} <= set(shared)
    defaults = EngineConfig()
    changed = {name: (not value) if isinstance(value, bool) else (value or 0) + 3
               for name, value in ((n, getattr(defaults, n)) for n in shared)}
    config = Settings(**changed).engine_config()
    assert {name: getattr(config, name) for name in shared} == changed


def test_pack_weights_is_on_by_default_and_off_from_the_environment(monkeypatch):
    assert Settings().engine_config().pack_weights is True
    monkeypatch.setenv("LORASERVE_PACK_WEIGHTS", "false")
    assert Settings().engine_config().pack_weights is False
