"""Figures of an adapter's analysis and of two adapters' similarity, with matplotlib (an optional
extra: `pip install 'loraserve[plot]'`). matplotlib is imported only when a figure is drawn, so the
client and the CLI work without it."""

from __future__ import annotations

import math
from pathlib import Path

from .errors import LoraserveError
from .types import AdapterAnalysis, AdapterSimilarity


def _pyplot():
    try:
        import matplotlib  # noqa: PLC0415 - optional: only figures need it
    except ImportError:
        raise LoraserveError("drawing a figure needs matplotlib: pip install 'loraserve[plot]'") from None
    matplotlib.use("Agg")  # files only: never open a window, work without a display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def short_name(module: str) -> str:
    """'model.layers.12.self_attn.q_proj' -> '12.q_proj': the layer index and the projection."""
    parts = module.split(".")
    index = next((p for p in parts if p.isdigit()), None)
    return f"{index}.{parts[-1]}" if index is not None else parts[-1]


def plot_analysis(analysis: AdapterAnalysis, path: str | Path) -> None:
    """Per layer: amplification, ‖ΔW‖_F, and a heatmap of log10(σ_i / σ_1) of each layer's update."""
    plt = _pyplot()
    layers = analysis.layers
    names = [short_name(layer["module"]) for layer in layers]
    x = range(len(layers))
    fig, (amp, norm, heat) = plt.subplots(
        3, 1, figsize=(max(8.0, 0.22 * len(layers)), 10), sharex=True, gridspec_kw={"height_ratios": [1, 1, 1.6]}
    )
    amp.bar(x, [layer["amplification"] or 0.0 for layer in layers], color="tab:orange")
    amp.set_ylabel("amplification\n‖ΔW‖ / ‖UᵀW0V‖")
    norm.bar(x, [layer["delta_norm"] for layer in layers], color="tab:blue")
    norm.set_ylabel("‖ΔW‖_F")
    image = heat.imshow(_relative_spectra(layers), aspect="auto", cmap="viridis", interpolation="nearest")
    heat.set_ylabel("singular value index")
    bar = fig.colorbar(image, ax=heat, orientation="horizontal", pad=0.25, fraction=0.05, label="log10(σ_i / σ_1)")
    bar.ax.xaxis.set_major_locator(plt.MaxNLocator(5))
    heat.set_xticks(list(x), names, rotation=90, fontsize=6)
    fig.suptitle(f"adapter {analysis.name}: rank {analysis.summary['rank']}, {analysis.summary['num_layers']} layers")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _relative_spectra(layers: list[dict]) -> list[list[float]]:
    """[rank, num_layers]: log10(σ_i / σ_1) per layer, NaN past a layer's rank (drawn blank)."""
    rank = max(len(layer["singular_values"]) for layer in layers)
    columns = []
    for layer in layers:
        s = layer["singular_values"]
        top = s[0] if s and s[0] > 0 else 1.0
        columns.append([math.log10(max(v / top, 1e-16)) for v in s] + [math.nan] * (rank - len(s)))
    return [list(row) for row in zip(*columns)]


def plot_similarity(similarity: AdapterSimilarity, path: str | Path) -> None:
    """φ per shared module, and its mean."""
    plt = _pyplot()
    layers = similarity.layers
    fig, ax = plt.subplots(figsize=(max(8.0, 0.22 * len(layers)), 4))
    ax.bar(range(len(layers)), [layer["similarity"] for layer in layers], color="tab:green")
    if similarity.mean is not None:
        ax.axhline(similarity.mean, color="black", linestyle="--", label=f"mean {similarity.mean:.3f}")
        ax.legend()
    ax.set_ylim(0, 1)
    ax.set_ylabel("φ = ‖Q1ᵀQ2‖² / min(r1, r2)")
    ax.set_xticks(range(len(layers)), [short_name(layer["module"]) for layer in layers], rotation=90, fontsize=6)
    ax.set_title(f"subspace similarity of {similarity.name} and {similarity.other}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
