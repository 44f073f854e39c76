"""Independent float64 references for the adapter analysis tests, and adapters whose update has a
known low rank. PEFT loads each adapter; ΔW = s·B·A is formed densely from PEFT's own factors and
scale, so nothing here goes through loraserve's reader or math."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file


def dense_reference(base, path: Path) -> dict[str, dict]:
    """module -> ΔW [out, in], W0 [out, in] and s, all float64, from PEFT's loaded layers."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    found = {}
    for name, layer in model.named_modules():
        if hasattr(layer, "lora_A") and "default" in layer.lora_A:
            a = layer.lora_A["default"].weight.double()  # [r, in]
            b = layer.lora_B["default"].weight.double()  # [out, r]
            scale = layer.scaling["default"]
            w0 = layer.get_base_layer().weight.double()
            w0 = w0.T if getattr(layer, "fan_in_fan_out", False) else w0
            found[name.removeprefix("base_model.model.")] = {"delta": scale * (b @ a), "w0": w0, "scale": scale, "a": a}
    return found


def reference_effective_rank(s: torch.Tensor, energy: float) -> int:
    fractions = torch.cumsum(s**2, 0) / (s**2).sum()
    return next(k + 1 for k in range(len(s)) if fractions[k] >= energy - 1e-12)


def projector_similarity(a1: torch.Tensor, a2: torch.Tensor) -> float:
    """φ through projectors: ‖Q1ᵀQ2‖²_F = tr(P1·P2), P = A⁺·A the projector on A's row space."""
    p1, p2 = torch.linalg.pinv(a1) @ a1, torch.linalg.pinv(a2) @ a2
    return float(torch.trace(p1 @ p2)) / min(len(a1), len(a2))


def low_rank_adapter(base, path: Path, make_peft_adapter, true_rank: int = 4, **kwargs) -> Path:
    """A PEFT adapter with r=32 whose every update has rank `true_rank` (B = B'·M through a narrow M)."""
    make_peft_adapter(base, path, r=32, lora_alpha=64, **kwargs)
    tensors = load_file(path / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(7)
    for key, tensor in tensors.items():
        if ".lora_B." in key:  # [out, 32]
            mix = torch.randn(true_rank, tensor.shape[1], generator=generator)
            tensors[key] = (tensor[:, :true_rank] @ mix).contiguous()
    save_file(tensors, path / "adapter_model.safetensors", metadata={"format": "pt"})
    return path
