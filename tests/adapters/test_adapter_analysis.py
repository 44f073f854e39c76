"""Adapter analysis, similarity and compression against an independent float64 reference: PEFT loads
each adapter, and the test forms ΔW = s·B·A densely from PEFT's own factors and scale, then takes
a full SVD of it. Regex targets, rank/alpha patterns, rsLoRA and GPT-2's Conv1D are all covered."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from adapters import InvalidAdapterError, wrap_model
from adapters.analysis import ENERGIES, analyze, base_weights, similarity
from adapters.compress import compress_dir
from adapters.peft_format import read_factors
from support.analysis import dense_reference, low_rank_adapter, projector_similarity, reference_effective_rank

PATTERNS = dict(
    r=8,
    lora_alpha=16,
    target_modules=r".*\.(q_proj|v_proj|down_proj)",
    rank_pattern={"v_proj": 4, "layers.1.self_attn.q_proj": 6},
    alpha_pattern={"down_proj": 3.0},
)
CASES = {
    "regex-patterns": ("tiny_llama", PATTERNS),
    "rslora": ("tiny_llama", dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"])),
    "conv1d": ("tiny_gpt2", dict(r=8, lora_alpha=32, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
}


def close(actual: float, expected: float, rtol: float = 1e-9) -> bool:
    return abs(actual - expected) <= rtol * max(abs(expected), 1e-300)


@pytest.fixture(params=list(CASES))
def case(request, tmp_path, make_peft_adapter):
    fixture, kwargs = CASES[request.param]
    base = request.getfixturevalue(fixture)
    return base, make_peft_adapter(base, tmp_path / request.param, **kwargs)


def test_analysis_matches_a_dense_float64_svd(case):
    base, path = case
    lora_model = wrap_model(copy.deepcopy(base))
    _, config, factors = read_factors(path)
    report = analyze("x", config, factors, base_weights(lora_model.layers))
    reference = dense_reference(base, path)
    assert sorted(layer["module"] for layer in report["layers"]) == sorted(reference)
    for layer in report["layers"]:
        ref = reference[layer["module"]]
        u, s, vh = torch.linalg.svd(ref["delta"])
        rank = ref["a"].shape[0]
        assert layer["rank"] == rank
        assert layer["scale"] == pytest.approx(ref["scale"], rel=1e-12)
        assert close(layer["delta_norm"], float(torch.linalg.matrix_norm(ref["delta"])))
        assert len(layer["singular_values"]) == rank
        for ours, theirs in zip(layer["singular_values"], s[:rank].tolist()):
            assert abs(ours - theirs) <= 1e-10 * s[0]
        for energy in ENERGIES:
            assert layer["effective_rank"][str(energy)] == reference_effective_rank(s, energy)
        projected = u[:, :rank].T @ ref["w0"] @ vh[:rank].T
        expected = float(torch.linalg.matrix_norm(ref["delta"]) / torch.linalg.matrix_norm(projected))
        assert close(layer["amplification"], expected, rtol=1e-8)
    summary = report["summary"]
    assert summary["num_layers"] == len(reference)
    assert summary["num_params"] == sum(
        r["a"].numel() + r["delta"].shape[0] * r["a"].shape[0] for r in reference.values()
    )
    # random factors on a tiny random base: some updates outweigh W0, and only those are flagged
    norm = torch.linalg.matrix_norm
    larger = [m for m, r in reference.items() if norm(r["delta"]) > norm(r["w0"])]
    expected = [f"{len(larger)} layer(s), e.g. {sorted(larger)[0]}"] if larger else []
    assert [w.partition(": ")[2] for w in summary["warnings"]] == expected


def test_similarity_matches_projections(case, tmp_path, make_peft_adapter):
    base, path = case
    fixture, kwargs = CASES[path.name]
    other = make_peft_adapter(base, tmp_path / "other", **kwargs)
    ours = similarity("a", "b", read_factors(path)[2], read_factors(other)[2])
    ref1, ref2 = dense_reference(base, path), dense_reference(base, other)
    for layer in ours["layers"]:
        expected = projector_similarity(ref1[layer["module"]]["a"], ref2[layer["module"]]["a"])
        assert layer["similarity"] == pytest.approx(expected, rel=1e-9)
    assert ours["mean"] == pytest.approx(sum(x["similarity"] for x in ours["layers"]) / len(ours["layers"]))
    itself = similarity("a", "a", read_factors(path)[2], read_factors(path)[2])
    assert all(layer["similarity"] == pytest.approx(1.0) for layer in itself["layers"])


@pytest.mark.parametrize("fixture,targets", [("tiny_llama", r".*\.(q_proj|gate_proj)"), ("tiny_gpt2", ["c_attn"])])
def test_rank_4_update_compresses_to_rank_4_and_peft_loads_it_identically(
    request, fixture, targets, tmp_path, make_peft_adapter
):
    base = request.getfixturevalue(fixture)
    original = low_rank_adapter(
        base, tmp_path / "r32", make_peft_adapter, target_modules=targets, fan_in_fan_out=fixture == "tiny_gpt2"
    )
    report = compress_dir(original, tmp_path / "r4", energy=0.9999)
    assert report.rank_before == 32 and report.rank == 4 and set(report.ranks.values()) == {4}
    assert report.energy_kept == pytest.approx(1.0, abs=1e-12)
    before, after = dense_reference(base, original), dense_reference(base, tmp_path / "r4")
    assert sorted(after) == sorted(before)
    for module, ref in before.items():
        assert after[module]["a"].shape[0] == 4
        err = torch.linalg.matrix_norm(after[module]["delta"] - ref["delta"])
        assert err <= 1e-6 * torch.linalg.matrix_norm(ref["delta"])
    assert report.params_after * 8 == report.params_before
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    outputs = [PeftModel.from_pretrained(copy.deepcopy(base), str(p))(ids).logits for p in (original, tmp_path / "r4")]
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-5)


def test_truncation_is_the_best_rank_k_approximation(tiny_llama, tmp_path, make_peft_adapter):
    path = make_peft_adapter(tiny_llama, tmp_path / "full", **PATTERNS)
    report = compress_dir(path, tmp_path / "small", energy=0.9, max_rank=3)
    before, after = dense_reference(tiny_llama, path), dense_reference(tiny_llama, tmp_path / "small")
    kept = total = 0.0
    for module, ref in before.items():
        s = torch.linalg.svd(ref["delta"]).S
        k = min(3, reference_effective_rank(s, 0.9))
        assert report.ranks[module] == after[module]["a"].shape[0] == k
        # Eckart-Young: the error of the best rank-k approximation is the tail of the spectrum
        err = torch.linalg.matrix_norm(after[module]["delta"] - ref["delta"])
        assert float(err) == pytest.approx(float(s[k:].norm()), rel=1e-5, abs=1e-6)
        kept, total = kept + float((s[:k] ** 2).sum()), total + float((s**2).sum())
    assert report.energy_kept == pytest.approx(kept / total, rel=1e-9)
    assert report.params_after == sum(report.ranks[m] * sum(r["delta"].shape) for m, r in before.items())


@pytest.mark.parametrize(
    "energy,max_rank,field",
    [(0.0, None, "energy"), (1.5, None, "energy"), (None, 0, "max_rank"), (None, None, "energy")],
)
def test_bad_compression_fields_name_the_field(tiny_llama, tmp_path, make_peft_adapter, energy, max_rank, field):
    path = make_peft_adapter(tiny_llama, tmp_path / "a", r=4, target_modules=["q_proj"])
    with pytest.raises(InvalidAdapterError) as caught:
        compress_dir(path, tmp_path / "out", energy=energy, max_rank=max_rank)
    assert caught.value.field == field
    assert not (tmp_path / "out").exists()
