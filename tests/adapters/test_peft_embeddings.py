"""LoRA on the input embedding and the output head (tied on GPT-2, untied on the tiny Llama) against
PEFT's own forward, mixed row by row with plain LoRA and base rows, gathered and merged; the head's
delta follows the rows the step keeps; the saved full matrices PEFT writes beside them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_peft_equivalence import (
    GROUPED,
    load_peft,
    logits,
    merged_logits,
    peft_merged_logits,
    wrap_with,
)
from test_peft_variants import (
    check_rows,
    peft_composed_logits,
    tolerance,
)

from adapters import BASE_SLOT, LoraBatch, UnsupportedAdapterError, load_adapter
from support.engine import PROMPTS, encode, greedy, hf_greedy, make_engine, peft_reference, pristine_model

BASE = "__base__"
KINDS = {
    "llama": dict(
        emb=dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"]),
        head=dict(r=8, lora_alpha=16, target_modules=["lm_head", "v_proj"]),
        both=dict(r=2, lora_alpha=4, target_modules=["embed_tokens", "lm_head"]),
        plain=dict(r=4, lora_alpha=8, target_modules=["k_proj", "v_proj"]),
    ),
    "gpt2": dict(
        emb=dict(r=4, lora_alpha=8, target_modules=["wte", "c_attn"]),
        head=dict(r=8, lora_alpha=16, target_modules=["lm_head", "c_fc"]),
        both=dict(r=2, lora_alpha=4, target_modules=["wte", "lm_head"]),
        plain=dict(r=4, lora_alpha=8, target_modules=["c_attn"]),
    ),
}
ROWS = ["emb", BASE, "head", "plain", "both", "emb", BASE, "head"]
COMPOSITION = (("emb", 0.5), ("head", -0.5), ("both", 1.0))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def embedded(request, tmp_path_factory, tiny_llama, tiny_gpt2, make_peft_adapter):
    base = tiny_llama if request.param == "llama" else tiny_gpt2
    root = tmp_path_factory.mktemp(f"embedded-{request.param}")
    paths = {name: make_peft_adapter(base, root / name, **kw) for name, kw in KINDS[request.param].items()}
    ids = torch.randint(0, 128, (len(ROWS), 5), generator=torch.Generator().manual_seed(5))
    peft_model = load_peft(base, paths)
    with torch.no_grad():
        singles = {name: peft_composed_logits(peft_model, ((name, 1.0),), ids) for name in paths}
        halves = {name: peft_composed_logits(peft_model, ((name, 1.0),), ids[:3]) for name in paths}
        singles["composed"] = peft_composed_logits(peft_model, COMPOSITION, ids)
        merged = {}
        for name in paths:  # a tied matrix: PEFT's merge writes one delta into both (peft#2777); we do not
            peft_model.base_model.set_adapter(name)
            tied = base.config.tie_word_embeddings
            merged[name] = singles[name] if tied else peft_merged_logits(peft_model, name, ids)
        with peft_model.disable_adapter():
            singles[BASE] = logits(peft_model, ids)
    for name in [*paths, "composed"]:
        assert (singles[name] - singles[BASE]).abs().max() > 1e-2, f"{name} must change the logits"
    noise = max((singles[name][:3] - halves[name]).abs().max().item() for name in paths)
    return dict(base=base, paths=paths, ids=ids, singles=singles, merged=merged, noise=noise)


def row_terms(slots: dict, rows: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """[K, B] slots and scales; the row "composed" is COMPOSITION, BASE has no term."""
    terms = [COMPOSITION if name == "composed" else () if name == BASE else ((name, 1.0),) for name in rows]
    row_slots, row_scales = torch.full((3, len(rows)), BASE_SLOT), torch.ones(3, len(rows))
    for i, row in enumerate(terms):
        for k, (name, scale) in enumerate(row):
            row_slots[k, i], row_scales[k, i] = slots[name], scale
    return row_slots, row_scales


@pytest.mark.parametrize("split", [dict(max_direct_runs=10**6), GROUPED], ids=["runs", "grouped"])
def test_embedding_and_head_lora_mixed_batch_match_peft(embedded, split):
    lora_model, registry = wrap_with(embedded["base"], embedded["paths"])
    slots = {name: registry.acquire(name).slot for name in embedded["paths"]}
    singles, rows = embedded["singles"], ROWS + ["composed"]
    ids = torch.cat([embedded["ids"], embedded["ids"][:1]])  # the composed row reads row 0's tokens
    with torch.no_grad():
        ours_base = lora_model.model(ids).logits
    atol = tolerance(embedded["noise"], (ours_base[:-1] - singles[BASE]).abs().max().item(), reference=singles[BASE])
    row_slots, row_scales = row_terms(slots, rows)
    batch = LoraBatch.build(
        row_slots.repeat_interleave(ids.shape[1], dim=1),
        token_scales=row_scales.repeat_interleave(ids.shape[1], dim=1),
        **split,
    )
    assert batch.groups is None if split is not GROUPED else not batch.runs
    with lora_model.gather(batch), torch.no_grad():
        ours = lora_model.model(ids).logits
    check_rows(ours[:-1], singles, ROWS, atol)
    torch.testing.assert_close(ours[-1], singles["composed"][0], atol=atol, rtol=0, msg="composed row")
    base_rows = [i for i, name in enumerate(ROWS) if name == BASE]
    assert torch.equal(ours[base_rows], ours_base[base_rows]), "base rows must be untouched"


def test_embedding_and_head_lora_merged_match_peft(embedded):
    lora_model, registry = wrap_with(embedded["base"], embedded["paths"])
    atol = tolerance(embedded["noise"], 1e-5, reference=embedded["singles"][BASE])
    w0 = {name: layer.weight.clone() for name, layer in lora_model.layers.items()}
    for name in embedded["paths"]:
        slot = registry.acquire(name).slot
        ours = merged_logits(lora_model, embedded["ids"], slot)
        torch.testing.assert_close(ours, embedded["merged"][name], atol=atol, rtol=0, msg=name)
    assert all(torch.equal(layer.weight, w0[name]) for name, layer in lora_model.layers.items())


def test_head_lora_follows_the_kept_rows(embedded):
    """As in the engine, only the kept positions reach the head: its delta follows them."""
    lora_model, registry = wrap_with(embedded["base"], embedded["paths"])
    assert not lora_model.has_head_lora
    slots = {BASE: BASE_SLOT, **{name: registry.acquire(name).slot for name in embedded["paths"]}}
    assert lora_model.has_head_lora
    ids, singles = embedded["ids"], embedded["singles"]
    length = ids.shape[1]
    token_slots = torch.tensor([slots[name] for name in ROWS]).repeat_interleave(length)
    keep = torch.arange(length - 1, ids.numel(), length)  # [B]: each row's last position, as flat rows
    batch = lora_model.build_batch(token_slots, keep=keep)
    with lora_model.gather(batch), torch.no_grad():
        ours = lora_model.model(ids, logits_to_keep=torch.tensor([length - 1])).logits[:, 0]  # [B, V]
    atol = tolerance(embedded["noise"], 1e-5, reference=singles[BASE])
    for i, name in enumerate(ROWS):
        torch.testing.assert_close(ours[i], singles[name][i, -1], atol=atol, rtol=0, msg=f"row {i} ({name})")
    base_only = lora_model.build_batch(token_slots, keep=keep[[i for i, n in enumerate(ROWS) if n == BASE]])
    assert base_only.runs and not base_only.head.runs and base_only.head.groups is None, (
        "no kept adapter row: the head adds nothing, and never all N rows' deltas"
    )


def _rewrite(path, out, change):
    out.mkdir()
    (out / "adapter_config.json").write_bytes((path / "adapter_config.json").read_bytes())
    tensors = load_file(path / "adapter_model.safetensors")
    change(tensors)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def test_saved_full_matrices(embedded, tmp_path):
    """PEFT saves the embedding's and head's whole matrix beside their LoRA: equal to the base's, it is
    ignored; retrained, it becomes a per-row copy (test_peft_modules_to_save serves it); resized, it is
    refused naming the tensor."""
    lora_model, _ = wrap_with(embedded["base"], {})
    path = embedded["paths"]["both"]
    keys = [key for key in load_file(path / "adapter_model.safetensors") if key.endswith(".base_layer.weight")]
    assert len(keys) == 2
    assert load_adapter("both", path, lora_model.spec, max_rank=64).modules == {}
    for key in keys:
        module = key.removeprefix("base_model.model.").removesuffix(".base_layer.weight")
        changed = _rewrite(path, tmp_path / f"changed-{module}", lambda t, key=key: t[key].__setitem__((3, 0), 1.0))
        assert list(load_adapter("x", changed, lora_model.spec, max_rank=64).modules) == [module]
        resized = _rewrite(
            path, tmp_path / f"resized-{module}", lambda t, key=key: t.__setitem__(key, torch.zeros(130, 64))
        )
        with pytest.raises(UnsupportedAdapterError, match="resized vocabulary") as info:
            load_adapter("x", resized, lora_model.spec, max_rank=64)
        assert info.value.field == key.removeprefix("base_model.model.")


def test_identity_covers_embedding_and_head_lora(embedded, tmp_path):
    """The prefix cache keys K/V by identity: a different embedding A must give another identity."""
    lora_model, _ = wrap_with(embedded["base"], {})
    path = embedded["paths"]["both"]
    key = next(k for k in load_file(path / "adapter_model.safetensors") if k.endswith("lora_embedding_A"))
    changed = _rewrite(path, tmp_path / "changed", lambda t: t[key].mul_(2))
    same = load_adapter("same", path, lora_model.spec, max_rank=64)
    again = load_adapter("again", path, lora_model.spec, max_rank=64)
    other = load_adapter("other", changed, lora_model.spec, max_rank=64)
    assert same.identity == again.identity != other.identity


def test_engine_serves_embedding_and_head_lora_beside_others(adapter_paths, tmp_path, make_peft_adapter):
    """The engine keeps one row per sequence for the head: greedy tokens equal PEFT's generate,
    per request, with embedding+head, plain LoRA and base requests in the same steps."""
    paths = dict(
        adapter_paths,
        e=make_peft_adapter(
            pristine_model(), tmp_path / "e", r=4, lora_alpha=16, target_modules=["embed_tokens", "lm_head", "q_proj"]
        ),
    )
    requests = [(PROMPTS[0], "e", 8), (PROMPTS[0], None, 8), (PROMPTS[1], "a", 6), (PROMPTS[2], "e", 5)]
    engine = make_engine(paths)
    completions = engine.generate(
        [p for p, _, _ in requests], [greedy(n) for _, _, n in requests], [a for _, a, _ in requests]
    )
    reference = peft_reference(paths)
    for (prompt, adapter, n), completion in zip(requests, completions):
        assert completion.token_ids == hf_greedy(reference, encode(prompt), n, adapter), (prompt, adapter)
    assert completions[0].token_ids != completions[1].token_ids, "the adapter must change the output"
