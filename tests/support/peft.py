"""PEFT adapters with non-zero B for any base model, written to a directory; nothing downloaded."""

from __future__ import annotations

import copy
import shutil
import zlib
from pathlib import Path

import peft
import safetensors.torch
import torch


def make_peft_adapter(base: torch.nn.Module, path: str | Path, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for `base` (left untouched) to `path`, with random non-zero A and B.

    The weights are seeded by the directory name, so an adapter does not depend on which tests ran first.
    """
    path = Path(path)
    lora_kwargs.setdefault("init_lora_weights", False)  # PEFT's default B is zero: the adapter would be a no-op
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(path.name.encode()))
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora_kwargs))
    lora_b = [p for name, p in model.named_parameters() if ".lora_B." in name]
    assert lora_b and all(bool(p.any()) for p in lora_b), "every lora_B must be non-zero"
    model.save_pretrained(str(path))
    return path


def make_trained_adapter(base, path: Path, **lora_kwargs) -> Path:
    """A PEFT adapter with random A, B, lora_B biases, and DoRA magnitudes moved off ‖W0 + s·B·A‖
    (as training moves them): with m equal to the norm, DoRA would equal plain LoRA."""
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(path.name.encode()))
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.3 * torch.randn_like(param))
                elif ".lora_B." in name and name.endswith(".bias"):
                    param.copy_(0.5 * torch.randn_like(param))
    model.save_pretrained(str(path))
    return path


def make_overflowing_adapter(source: Path, target: Path, magnitude: float = 1e19) -> Path:
    """A copy of the adapter at `source` with A and B scaled so that their largest entries are
    `magnitude`: every weight is finite (it loads), but B·A·x overflows float32 activations, so the
    model's logits for it are NaN or infinite."""
    shutil.copytree(source, target)
    weights = target / "adapter_model.safetensors"
    tensors = safetensors.torch.load_file(str(weights))
    scaled = {k: v * (magnitude / v.abs().max()) if ".lora_" in k else v for k, v in tensors.items()}
    safetensors.torch.save_file(scaled, str(weights))
    return target


def peft_greedy_text(base, adapter_dir: str | Path, prompt: str, max_tokens: int) -> str:
    """What PEFT's own `generate` answers for `prompt` with the adapter at `adapter_dir` on `base` (a
    loaded BaseModel, left untouched), greedy and past EOS as the server's `ignore_eos`: the reference
    a served completion must equal."""
    from transformers import GenerationConfig  # noqa: PLC0415

    model = copy.deepcopy(base.model)
    model.generation_config.eos_token_id = None  # as ignore_eos: generate must not stop at EOS either
    reference = peft.PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = base.tokenizer(prompt, return_tensors="pt").input_ids
    greedy = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, pad_token_id=base.tokenizer.eos_token_id)
    with torch.inference_mode():
        out = reference.generate(ids, generation_config=greedy)
    return base.tokenizer.decode(out[0, ids.shape[1] :])
