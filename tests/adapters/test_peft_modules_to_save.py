"""modules_to_save (the copies PEFT saved, by either version's name rule) and a retrained embedding
matrix saved beside its LoRA: each adapter's full copies serve its rows only, beside plain LoRA and
base rows, gathered and merged, against PEFT's own forward; copies that cannot be served per row are
refused naming the field."""

from __future__ import annotations

import copy
import json
import zlib
from pathlib import Path

import peft
import pytest
import torch
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from test_peft_equivalence import GROUPED, load_peft, logits, merged_logits, wrap_with
from test_peft_variants import check_rows, tolerance

from adapters import BASE_SLOT, LoraBatch, UnsupportedAdapterError, load_adapter
from server.engine.adapter_ref import AdapterRef, bind
from server.engine.errors import RequestError
from support.engine import PROMPTS, encode, greedy, hf_greedy, make_engine, peft_reference, pristine_model

BASE = "__base__"
KINDS = {
    "llama": {
        # "norm" is a plain suffix up to PEFT 0.21 (every *norm) and a dotted name from 0.22 (model.norm):
        # input_layernorm keeps a per-layer copy in the test under both.
        "norms": {"target_modules": ["q_proj"], "modules_to_save": ["input_layernorm", "norm"]},
        "head": {"target_modules": ["v_proj"], "modules_to_save": ["lm_head"]},
        "emb": {"target_modules": ["embed_tokens", "k_proj"]},
        "plain": {"target_modules": ["k_proj", "v_proj"]},
    },
    "gpt2": {
        "norms": {"target_modules": ["c_attn"], "modules_to_save": ["ln_f", "ln_1"]},
        "head": {"target_modules": ["c_fc"], "modules_to_save": ["lm_head"]},
        "emb": {"target_modules": ["wte", "c_attn"]},
        "plain": {"target_modules": ["c_attn"]},
    },
}
ROWS = ["norms", BASE, "head", "plain", "emb", "norms", BASE, "head"]


def make_copied_adapter(base, path: Path, **lora_kwargs) -> Path:
    """A PEFT adapter whose full copies (modules_to_save, a saved embedding matrix) moved off the
    base's, as training moves them: a copy equal to the base's would prove nothing."""
    with torch.random.fork_rng():
        torch.manual_seed(zlib.crc32(path.name.encode()))
        model = peft.get_peft_model(
            copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **lora_kwargs)
        )
        model.save_pretrained(str(path))
        file = path / "adapter_model.safetensors"
        tensors = load_file(file)
        for key, tensor in tensors.items():
            if ".lora_" not in key:
                tensors[key] = tensor * (1 + 0.3 * torch.randn_like(tensor))
    save_file(tensors, file)
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def copied(request, tmp_path_factory, tiny_llama, tiny_gpt2):
    base = tiny_llama if request.param == "llama" else tiny_gpt2
    root = tmp_path_factory.mktemp(f"copied-{request.param}")
    paths = {name: make_copied_adapter(base, root / name, **kw) for name, kw in KINDS[request.param].items()}
    ids = torch.randint(0, 128, (len(ROWS), 5), generator=torch.Generator().manual_seed(6))
    singles, halves = {}, {}
    with torch.no_grad():
        for name, path in paths.items():  # one PEFT model each: PEFT loads a saved matrix into the base itself
            peft_model = load_peft(base, {name: path})
            singles[name], halves[name] = logits(peft_model, ids), logits(peft_model, ids[:3])
        singles[BASE] = logits(base, ids)
    for name in paths:
        assert (singles[name] - singles[BASE]).abs().max() > 1e-2, f"{name} must change the logits"
    noise = max((singles[name][:3] - halves[name]).abs().max().item() for name in paths)
    return dict(base=base, paths=paths, ids=ids, singles=singles, noise=noise, kind=request.param)


@pytest.mark.parametrize("split", ["server", "grouped"])
def test_copies_mixed_batch_match_peft(copied, split):
    lora_model, registry = wrap_with(copied["base"], copied["paths"])
    slots = {BASE: BASE_SLOT, **{name: registry.acquire(name).slot for name in copied["paths"]}}
    # PEFT saves the embedding matrix for "embed_tokens" targets, not GPT-2's "wte" (EMBEDDING_LAYER_NAMES)
    with_copies = ["norms", "head", "emb"] if copied["kind"] == "llama" else ["norms", "head"]
    assert lora_model.copy_slots == {slots[name] for name in with_copies}
    ids, singles = copied["ids"], copied["singles"]
    with torch.no_grad():
        ours_base = lora_model.model(ids).logits
    atol = tolerance(copied["noise"], (ours_base - singles[BASE]).abs().max().item(), reference=singles[BASE])
    token_slots = torch.tensor([slots[name] for name in ROWS]).repeat_interleave(ids.shape[1])
    direct = lora_model.dora_slots | lora_model.copy_slots
    batch = (
        lora_model.build_batch(token_slots)
        if split == "server"
        else LoraBatch.build(token_slots, **GROUPED, direct_slots=direct)
    )
    if split == "grouped":
        grouped = {slots[name] for name in slots if name != BASE and name not in with_copies}
        assert set(batch.groups.slot_list) == grouped, "rows of adapters with copies run directly"
    with lora_model.gather(batch), torch.no_grad():
        ours = lora_model.model(ids).logits
    check_rows(ours, singles, ROWS, atol)
    base_rows = [i for i, name in enumerate(ROWS) if name == BASE]
    assert torch.equal(ours[base_rows], ours_base[base_rows]), "base rows must be untouched"


def test_copies_merged_match_peft(copied):
    lora_model, registry = wrap_with(copied["base"], copied["paths"])
    atol = tolerance(copied["noise"], 1e-5, reference=copied["singles"][BASE])
    for name in copied["paths"]:
        ours = merged_logits(lora_model, copied["ids"], registry.acquire(name).slot)
        torch.testing.assert_close(ours, copied["singles"][name], atol=atol, rtol=0, msg=name)
    with torch.no_grad():
        assert torch.equal(lora_model.model(copied["ids"]).logits, logits(copied["base"], copied["ids"]))


def test_copies_count_in_memory_and_identity(copied, tmp_path):
    lora_model, _ = wrap_with(copied["base"], {})
    path = copied["paths"]["norms"]
    adapter = load_adapter("norms", path, lora_model.spec, max_rank=64)
    config = peft.LoraConfig(**KINDS[copied["kind"]]["norms"])
    wrapped = peft.get_peft_model(copy.deepcopy(copied["base"]), config).base_model.model
    saved_by_peft = {name for name, module in wrapped.named_modules() if isinstance(module, ModulesToSaveWrapper)}
    assert set(adapter.modules) == saved_by_peft, "every module PEFT copies, and no other"
    assert any(".0." in name for name in saved_by_peft), "a per-layer norm is among them"
    copy_bytes = sum(t.numel() * t.element_size() for params in adapter.modules.values() for t in params.values())
    factors = [t for w in adapter.weights.values() for t in (w.a, w.b, w.bias, w.magnitude) if t is not None]
    lora_bytes = sum(t.numel() * t.element_size() for t in factors)
    assert adapter.num_bytes == lora_bytes + copy_bytes > lora_bytes
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if ".lora_" not in k)
    tensors[key] = tensors[key] + 1
    changed = tmp_path / "changed"
    changed.mkdir()
    (changed / "adapter_config.json").write_bytes((path / "adapter_config.json").read_bytes())
    save_file(tensors, changed / "adapter_model.safetensors")
    other = load_adapter("other", changed, lora_model.spec, max_rank=64)
    assert other.identity != adapter.identity == load_adapter("again", path, lora_model.spec, max_rank=64).identity


def _with(path: Path, out: Path, config_change=None, tensor_change=None) -> Path:
    out.mkdir()
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(config_change or {})
    (out / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(path / "adapter_model.safetensors")
    if tensor_change:
        tensor_change(tensors)
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def test_copies_that_cannot_be_served_per_row_are_refused(copied, tmp_path):
    lora_model, _ = wrap_with(copied["base"], {})
    path = copied["paths"]["head"]
    key = next(k for k in load_file(path / "adapter_model.safetensors") if k.endswith("lm_head.weight"))
    resized = _with(path, tmp_path / "resized", tensor_change=lambda t: t.__setitem__(key, torch.zeros(130, 64)))
    with pytest.raises(UnsupportedAdapterError, match="resized vocabulary") as info:
        load_adapter("x", resized, lora_model.spec, max_rank=64)
    assert info.value.field == key.removeprefix("base_model.model.")
    layer = "model.layers.0.self_attn" if copied["kind"] == "llama" else "transformer.h.0.attn"

    def whole_block(tensors):  # a copy of an attention block: its rows depend on other rows
        del tensors[key]
        tensors[
            f"base_model.model.{layer}.o_proj.weight"
            if copied["kind"] == "llama"
            else f"base_model.model.{layer}.c_proj.weight"
        ] = torch.zeros(64, 64)

    whole = _with(path, tmp_path / "whole", {"modules_to_save": [layer.rpartition(".")[2]]}, whole_block)
    with pytest.raises(UnsupportedAdapterError, match="cannot be served per row") as info:
        load_adapter("x", whole, lora_model.spec, max_rank=64)
    assert info.value.field == "modules_to_save"


def test_engine_serves_copies_beside_others_and_refuses_composing_them(adapter_paths, tmp_path):
    """The head's copy follows the engine's kept rows; greedy tokens equal PEFT's generate per request."""
    paths = dict(
        adapter_paths,
        m=make_copied_adapter(
            pristine_model(), tmp_path / "m", target_modules=["q_proj"], modules_to_save=["lm_head", "norm"]
        ),
    )
    requests = [(PROMPTS[0], "m", 8), (PROMPTS[0], None, 8), (PROMPTS[1], "a", 6), (PROMPTS[2], "m", 5)]
    engine = make_engine(paths)
    completions = engine.generate(
        [p for p, _, _ in requests], [greedy(n) for _, _, n in requests], [a for _, a, _ in requests]
    )
    # PEFT's mixed batches take no modules_to_save: "m" runs alone, as the injected model with it active
    only_m, others = peft_reference({"m": paths["m"]}).get_base_model(), peft_reference(adapter_paths)
    for (prompt, adapter, n), completion in zip(requests, completions):
        expected = (
            hf_greedy(only_m, encode(prompt), n) if adapter == "m" else hf_greedy(others, encode(prompt), n, adapter)
        )
        assert completion.token_ids == expected, (prompt, adapter)
    assert completions[0].token_ids != completions[1].token_ids, "the copies must change the output"
    with pytest.raises(RequestError) as info:
        bind(engine.registry, AdapterRef.composed((("a", 0.5), ("m", 1.0))), max_loras=4)
    assert info.value.field == "adapters[1].name"
