"""Server settings: every field is a CLI flag and a LORASERVE_* environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.config import EngineConfig, EngineSettings


class Settings(BaseSettings, EngineSettings):
    """Configuration of one loraserve process (environment: LORASERVE_<FIELD>).

    The engine's knobs are inherited from `EngineSettings`, declared once there. Inheritance, not a
    nested `engine: EngineConfig` field, because each knob must stay a flat LORASERVE_MAX_LORAS and
    --max-loras (deploy manifests and scripts use them): a nested field would need a delimiter in
    every variable name and per-field aliases to undo it. A knob whose server default differs from
    the engine's is declared again below, where the difference shows."""

    model_config = SettingsConfigDict(env_prefix="LORASERVE_", extra="ignore")

    model: str | None = None  # HF directory or .gguf file; None = the embedded default model
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # auto: bfloat16 on CUDA (or the config's half dtype), float32 on CPU (model_loader.auto_dtype).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "cpu"
    adapters: list[str] = Field(default_factory=list)  # NAME=PATH, preloaded at start
    adapter_store: Path | None = None  # uploads persist here; shared by replicas
    adapter_root: Path | None = None  # lora_path of load_lora_adapter must lie under it
    # Resolution on first use (server/sources.py): a directory, file://DIR, s3://BUCKET/PREFIX or
    # hf://ORG[@REV][/SUBFOLDER], tried in order for a `model` the server does not know.
    adapter_source: list[str] = Field(default_factory=list)
    adapter_source_timeout: float = Field(30.0, gt=0)  # per source and name, retries included: 503 past it
    adapter_source_retries: int = Field(2, ge=0)  # transient failures only, with backoff
    adapter_source_negative_ttl: float = Field(10.0, ge=0)  # a name found nowhere is a 404 this long untried
    adapter_source_check_base: bool = False  # base_model_name_or_path must name the served base (422 if not)
    adapter_source_in_load: bool = False  # load_lora_adapter's lora_path may be <a source's URI>/<name>
    adapter_store_max_bytes: int | None = Field(None, ge=1)  # resolved adapters evicted LRU past it; None: no budget
    # Rank compression of every resolved adapter, as an upload's energy / max_rank fields ask (the stored copy too).
    adapter_source_energy: float | None = Field(None, gt=0.0, le=1.0)
    adapter_source_max_rank: int | None = Field(None, ge=1)
    api_key: str | None = None
    admin_key: str | None = None  # guards upload, load, unload and delete when set
    metrics_require_key: bool = False
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # Request limits (400 naming the field). OpenAI allows 4 stop sequences; a prompt longer than
    # max_model_len x the longest token's bytes cannot fit, so None derives the byte limit from that.
    max_stop_sequences: int = Field(4, ge=0)
    max_stop_length: int = Field(256, ge=1)
    max_adapters_per_request: int = Field(4, ge=1)  # entries of the `adapters` composition field
    max_prompt_bytes: int | None = Field(None, ge=1)
    max_prompts_per_request: int = Field(64, ge=1)  # entries of a completion's list `prompt`
    max_stop_token_ids: int = Field(128, ge=0)  # stop_token_ids entries (checked per generated token)
    # Bodies, connections and workers (docs/operating.md): a client cannot hold the loop, the
    # memory or the worker threads that other users need.
    max_request_bytes: int | None = Field(None, ge=1)  # JSON bodies; None: 4 x max_prompt_bytes + 1 MiB
    request_read_timeout: float = Field(30.0, gt=0)  # a JSON body whole; an upload, each chunk
    request_header_timeout: float = Field(10.0, gt=0)  # from connect (or the last response) to full headers
    keep_alive_timeout: float = Field(5.0, gt=0)  # idle keep-alive connections are closed after it
    max_connections: int = Field(1000, ge=1)  # uvicorn's limit_concurrency: 503 past it
    serving_workers: int = Field(16, ge=1)  # tokenizing, templates, grammars, store IO, parses
    analysis_workers: int = Field(1, ge=1)  # adapter analysis and similarity (float64 SVDs)
    max_queued_analyses: int = Field(4, ge=0)  # waiting for an analysis worker; 429 past it
    # The engine alone defaults to packed (deterministic tests); a server measures once per CPU.
    kernel_choice: Literal["auto", "packed", "plain"] = "auto"  # auto: measured per weight shape, cached per CPU
    # The engine alone decodes eagerly (no compile in tests); a server compiles its one-stream step
    # and keeps it where it measured faster than eager on this CPU (cached per CPU model).
    compile_decode: Literal["auto", "on", "off"] = "auto"
    shutdown_timeout: float = Field(30.0, ge=0)  # seconds in-flight requests get on SIGTERM
    log_level: str = "info"
    log_format: str = Field("plain", pattern="^(plain|json)$")
    max_adapter_labels: int = Field(100, ge=1)  # per-adapter metric series; the rest share one label

    @field_validator("api_key", "admin_key")
    @classmethod
    def _usable_key(cls, key: str | None, info) -> str | None:
        """An empty key would turn its check off, and a padded one (a secret file's trailing newline)
        could never match what a client sends: both are refused at startup, naming the setting."""
        if key is not None and (not key or key != key.strip()):
            problem = "is empty" if not key.strip() else "has leading or trailing whitespace"
            raise ValueError(
                f"LORASERVE_{info.field_name.upper()} / --{info.field_name.replace('_', '-')} "
                f"{problem}: unset it, or strip the secret"
            )
        return key

    @field_validator("adapter_source")
    @classmethod
    def _readable_sources(cls, uris: list[str]) -> list[str]:
        from server.sources import check_source_uri  # noqa: PLC0415 - it imports torch; client commands import settings

        return [check_source_uri(uri) for uri in uris]

    def engine_config(self) -> EngineConfig:
        """The engine's knobs as set here; the policy only tests tune keeps EngineConfig's defaults."""
        return EngineConfig(**self.model_dump(include=set(EngineSettings.model_fields)))
