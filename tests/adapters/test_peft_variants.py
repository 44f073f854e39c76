"""DoRA, LoRA biases and per-row compositions against PEFT's own forward, in mixed batches (rows of
DoRA, plain LoRA, composed and base side by side), gathered (runs and grouped) and merged.

Tolerances are measured, not fixed: PEFT against itself on the same rows in another batch shape,
and our base rows against PEFT's, floored at a few fp32 steps of the largest logit."""

from __future__ import annotations

import pytest
import torch
from peft.tuners.lora import LoraLayer
from test_peft_equivalence import (
    GROUPED,
    gather_logits,
    load_peft,
    logits,
    merged_logits,
    peft_merged_logits,
    wrap_with,
)

from adapters import BASE_SLOT, LoraBatch
from support.peft import make_trained_adapter

BASE = "__base__"
FLOAT_ULPS = 64


def tolerance(*noises: float, reference: torch.Tensor) -> float:
    """Twice the largest measured kernel noise, at least FLOAT_ULPS fp32 steps of the largest logit."""
    floor = FLOAT_ULPS * torch.finfo(torch.float32).eps * reference.abs().max().item()
    return max([floor] + [2 * noise for noise in noises])


def check_rows(ours, expected_rows: dict, rows: list[str], atol: float) -> None:
    for i, name in enumerate(rows):
        torch.testing.assert_close(ours[i], expected_rows[name][i], atol=atol, rtol=0, msg=f"row {i} ({name})")


# DoRA and LoRA bias: PEFT's forward with each adapter alone is the reference for its rows (PEFT
# refuses DoRA in its own mixed batches, `adapter_names`).
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = {
    "llama": dict(
        d8=dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_dora=True),
        d16=dict(r=16, lora_alpha=8, target_modules=LLAMA_ALL, use_dora=True, use_rslora=True),
        bias=dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_bias=True),
        plain=dict(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"]),
    ),
    "gpt2": dict(
        d8=dict(r=8, lora_alpha=16, target_modules=["c_attn"], use_dora=True, fan_in_fan_out=True),
        d16=dict(r=16, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], use_dora=True, fan_in_fan_out=True),
        bias=dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_bias=True, fan_in_fan_out=True),
        plain=dict(r=4, lora_alpha=8, target_modules=["c_fc"], fan_in_fan_out=True),
    ),
}
ROWS = ["d8", BASE, "plain", "d16", "bias", "d8", BASE, "bias"]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def variants(request, tmp_path_factory, tiny_llama, tiny_gpt2):
    base = tiny_llama if request.param == "llama" else tiny_gpt2
    root = tmp_path_factory.mktemp(f"variants-{request.param}")
    paths = {name: make_trained_adapter(base, root / name, **kw) for name, kw in VARIANTS[request.param].items()}
    ids = torch.randint(0, 128, (len(ROWS), 5), generator=torch.Generator().manual_seed(3))
    peft_model = load_peft(base, paths)
    with torch.no_grad():
        singles = {name: peft_composed_logits(peft_model, ((name, 1.0),), ids) for name in paths}
        halves = {name: peft_composed_logits(peft_model, ((name, 1.0),), ids[:3]) for name in paths}
        with peft_model.disable_adapter():
            singles[BASE] = logits(peft_model, ids)
        merged = {}
        for name in paths:  # PEFT cannot merge a lora_B bias into a layer without one; we can
            peft_model.base_model.set_adapter(name)
            can_merge = request.param == "gpt2" or not VARIANTS["llama"][name].get("lora_bias")
            merged[name] = peft_merged_logits(peft_model, name, ids) if can_merge else singles[name]
    for name in paths:
        assert (singles[name] - singles[BASE]).abs().max() > 1e-2, f"{name} must change the logits"
    noise = max((singles[name][:3] - halves[name]).abs().max().item() for name in paths)
    return dict(base=base, paths=paths, ids=ids, singles=singles, merged=merged, noise=noise)


@pytest.mark.parametrize("split", [dict(max_direct_runs=10**6), GROUPED], ids=["runs", "grouped"])
def test_dora_and_bias_mixed_batch_match_peft(variants, split):
    lora_model, registry = wrap_with(variants["base"], variants["paths"])
    slots = {BASE: BASE_SLOT, **{name: registry.acquire(name).slot for name in variants["paths"]}}
    ids, singles = variants["ids"], variants["singles"]
    ours_base = gather_logits(lora_model, ids, [BASE_SLOT] * len(ROWS))
    atol = tolerance(variants["noise"], (ours_base - singles[BASE]).abs().max().item(), reference=singles[BASE])
    row_slots = torch.tensor([slots[name] for name in ROWS]).repeat_interleave(ids.shape[1])
    batch = LoraBatch.build(row_slots, direct_slots=lora_model.dora_slots, **split)
    if split is GROUPED:
        assert batch.groups is not None and {run.slot for run in batch.runs} == {slots["d8"], slots["d16"]}
    with lora_model.gather(batch), torch.no_grad():
        ours = lora_model.model(ids).logits
    check_rows(ours, singles, ROWS, atol)
    base_rows = [i for i, name in enumerate(ROWS) if name == BASE]
    assert torch.equal(ours[base_rows], ours_base[base_rows]), "base rows must be untouched"


def test_dora_and_bias_merged_match_peft(variants):
    lora_model, registry = wrap_with(variants["base"], variants["paths"])
    ids = variants["ids"]
    atol = tolerance(variants["noise"], reference=variants["singles"][BASE])
    for name in variants["paths"]:
        slot = registry.acquire(name).slot
        torch.testing.assert_close(merged_logits(lora_model, ids, slot), variants["merged"][name], atol=atol, rtol=0)
    w0 = {name: layer.weight.clone() for name, layer in lora_model.layers.items()}
    assert all(torch.equal(layer.weight, w0[name]) for name, layer in lora_model.layers.items())


def test_dora_scale_is_computed_once_per_load(variants):
    """The magnitude's norm is taken at load; a gathered forward is B·A plus one multiply-add."""
    lora_model, registry = wrap_with(variants["base"], variants["paths"])
    slot = registry.acquire("d8").slot
    layers = [layer for layer in lora_model.layers.values() if layer.extras is not None]
    assert layers and all(layer.extras.is_dora[slot] for layer in layers)
    assert slot in lora_model.dora_slots
    batch = lora_model.build_batch(torch.full((20,), slot), keep=None)
    assert batch.groups is None, "DoRA rows always run directly"
    grouped = LoraBatch.build(torch.full((20,), slot), **GROUPED, direct_slots=lora_model.dora_slots)
    assert grouped.groups is None and len(grouped.runs) == 1


# Compositions: PEFT with several active adapters, each at its scale (set_scale), is the reference.
COMPOSITIONS = {
    "one": (("a", 0.5),),
    "two": (("a", 1.0), ("b", 0.7)),
    "three": (("a", 0.5), ("b", -0.5), ("c", 1.0)),
    "neg": (("b", -0.5),),
}
COMPOSED_ROWS = ["two", BASE, "three", "a", "one", "two", "neg", "three"]


def peft_composed_logits(peft_model, terms, ids):
    names = [name for name, _ in terms]
    peft_model.base_model.set_adapter(names)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            for name, scale in terms:
                if name in module.scaling:
                    module.set_scale(name, scale)
    try:
        return logits(peft_model, ids)
    finally:
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                for name in names:
                    if name in module.scaling:
                        module.set_scale(name, 1.0)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def composed(request, tmp_path_factory, tiny_llama, tiny_gpt2, make_peft_adapter):
    llama = request.param == "llama"
    base = tiny_llama if llama else tiny_gpt2
    extra = {} if llama else dict(fan_in_fan_out=True)
    kinds = dict(
        a=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"] if llama else ["c_attn"]),
        b=dict(r=8, lora_alpha=4, target_modules="all-linear"),
        c=dict(r=2, lora_alpha=8, target_modules=["v_proj", "up_proj"] if llama else ["c_fc"], lora_bias=True),
    )
    root = tmp_path_factory.mktemp(f"composed-{request.param}")
    paths = {name: make_trained_adapter(base, root / name, **kw, **extra) for name, kw in kinds.items()}
    ids = torch.randint(0, 128, (len(COMPOSED_ROWS), 5), generator=torch.Generator().manual_seed(4))
    peft_model = load_peft(base, paths)
    with torch.no_grad():
        expected = {name: peft_composed_logits(peft_model, terms, ids) for name, terms in COMPOSITIONS.items()}
        expected["a"] = peft_composed_logits(peft_model, (("a", 1.0),), ids)
        with peft_model.disable_adapter():
            expected[BASE] = logits(peft_model, ids)
        # The same compositions in another batch shape: PEFT's own noise.
        expected_half = {name: peft_composed_logits(peft_model, terms, ids[:3]) for name, terms in COMPOSITIONS.items()}
    for name in ("one", "two", "three", "neg"):
        assert (expected[name] - expected[BASE]).abs().max() > 1e-2
    assert (expected["two"] - peft_composed_logits(peft_model, (("a", 1.0), ("b", 1.0)), ids)).abs().max() > 1e-2
    noise = max((expected[name][:3] - expected_half[name]).abs().max().item() for name in COMPOSITIONS)
    return dict(base=base, paths=paths, ids=ids, expected=expected, noise=noise)


def composed_rows(slots: dict, rows: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, B] slots and scales, one term per line; BASE_SLOT where a row has fewer terms."""
    terms = [COMPOSITIONS.get(name, ((name, 1.0),) if name != BASE else ()) for name in rows]
    depth = max(len(t) for t in terms)
    row_slots = torch.full((depth, len(rows)), BASE_SLOT)
    row_scales = torch.ones(depth, len(rows))
    for i, row_terms in enumerate(terms):
        for k, (name, scale) in enumerate(row_terms):
            row_slots[k, i], row_scales[k, i] = slots[name], scale
    return row_slots, row_scales


ALL_RUNS = dict(max_direct_runs=10**6)  # every stretch as a direct run, however many


@pytest.mark.parametrize("split", [ALL_RUNS, {}, GROUPED], ids=["runs", "server-split", "grouped"])
def test_compositions_mixed_batch_match_peft(composed, split):
    lora_model, registry = wrap_with(composed["base"], composed["paths"])
    slots = {name: registry.acquire(name).slot for name in composed["paths"]}
    ids, expected = composed["ids"], composed["expected"]
    ours_base = gather_logits(lora_model, ids, [BASE_SLOT] * len(COMPOSED_ROWS))
    atol = tolerance(composed["noise"], (ours_base - expected[BASE]).abs().max().item(), reference=expected[BASE])
    row_slots, row_scales = composed_rows(slots, COMPOSED_ROWS)
    length = ids.shape[1]
    batch = LoraBatch.build(
        row_slots.repeat_interleave(length, dim=1), token_scales=row_scales.repeat_interleave(length, dim=1), **split
    )
    assert batch.groups is None if split is ALL_RUNS else not batch.runs  # the server's split groups these
    with lora_model.gather(batch), torch.no_grad():
        ours = lora_model.model(ids).logits
    check_rows(ours, expected, COMPOSED_ROWS, atol)


def test_compositions_merged_match_peft(composed):
    lora_model, registry = wrap_with(composed["base"], composed["paths"])
    slots = {name: registry.acquire(name).slot for name in composed["paths"]}
    expected = composed["expected"]
    atol = tolerance(composed["noise"], 1e-5, reference=expected[BASE])  # merging rounds W0 + Σ once more
    for name, terms in COMPOSITIONS.items():
        target = tuple((slots[adapter], scale) for adapter, scale in terms)
        lora_model.merge(target)
        try:
            with torch.no_grad():
                ours = lora_model.model(composed["ids"]).logits
        finally:
            lora_model.unmerge()
        torch.testing.assert_close(ours, expected[name], atol=atol, rtol=0, msg=name)
