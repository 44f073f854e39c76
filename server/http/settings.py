"""Server settings: every field is a CLI flag and a LORASERVE_* environment variable."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.config import EngineConfig


class Settings(BaseSettings):
    """Configuration of one loraserve process (environment: LORASERVE_<FIELD>)."""

    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="ignore")

    model: str | None = None  # HF directory or .gguf file; None = the embedded default model
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: str = Field("float32", pattern="^(float32|float16|bfloat16)$")
    device: str = "cpu"
    adapters: list[str] = Field(default_factory=list)  # NAME=PATH, preloaded at start
    adapter_store: Path | None = None  # uploads persist here; shared by replicas
    adapter_root: Path | None = None  # lora_path of load_lora_adapter must lie under it
    api_key: str | None = None
    admin_key: str | None = None  # guards upload, load, unload and delete when set
    metrics_require_key: bool = False
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    max_loras: int = Field(4, ge=1)
    max_lora_rank: int = Field(64, ge=1)
    max_cpu_loras: int = Field(16, ge=0)
    max_num_seqs: int = Field(32, ge=1)
    max_num_batched_tokens: int = Field(512, ge=1)
    kv_cache_tokens: int = Field(16384, ge=16)
    max_model_len: int | None = Field(None, ge=1)
    max_waiting: int = Field(1024, ge=1)
    enable_prefix_caching: bool = True  # vLLM's --enable-prefix-caching/--no-enable-prefix-caching
    block_size: int = Field(16, ge=16, multiple_of=16)  # prefix-cache block, in tokens (vLLM's --block-size)
    # Request limits (400 naming the field). OpenAI allows 4 stop sequences; a prompt longer than
    # max_model_len x the longest token's bytes cannot fit, so None derives the byte limit from that.
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_length: int = Field(256, ge=1)
    max_adapters_per_request: int = Field(4, ge=1)  # entries of the `adapters` composition field
    max_prompt_bytes: int | None = Field(None, ge=1)
    pack_weights: bool = True  # CPU fp32/bf16: oneDNN-packed base weights where faster, one more weight copy
    kernel_choice: Literal["auto", "packed", "plain"] = "auto"  # auto: measured per weight shape, cached per CPU
    quantization: Literal["none", "int8"] = "none"  # int8: weight-only int8 base linears; adapters stay in --dtype
    shutdown_timeout: float = Field(30.0, ge=0)  # seconds in-flight requests get on SIGTERM
    log_level: str = "info"
    log_format: str = Field("plain", pattern="^(plain|json)$")
    max_adapter_labels: int = Field(100, ge=1)  # per-adapter metric series; the rest share one label
    cache_dir: Path | None = None  # where GGUF models are converted and kernel choices kept, once

    def engine_config(self) -> EngineConfig:
        """The engine's knobs that are also settings, by name; the rest keep EngineConfig's defaults."""
        return EngineConfig(**{name: getattr(self, name) for name in EngineConfig.model_fields
                               if name in type(self).model_fields})
