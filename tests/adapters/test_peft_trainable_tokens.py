"""Trainable tokens (PEFT's trainable_token_indices): an adapter's new rows for some token ids of the
embedding, and of the head tied to it (GPT-2), serve its rows only, beside plain LoRA and base rows,
gathered and merged, against PEFT's own forward."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_peft_equivalence import load_peft, logits, merged_logits, wrap_with
from test_peft_modules_to_save import make_copied_adapter
from test_peft_variants import check_rows, tolerance

from adapters import BASE_SLOT, IncompatibleAdapterError, load_adapter

BASE = "__base__"
TOKENS = [3, 5, 17]
ROWS = ["tok", BASE, "plain", "tok", BASE]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tokens(request, tmp_path_factory, tiny_llama, tiny_gpt2):
    llama = request.param == "llama"
    base = tiny_llama if llama else tiny_gpt2
    root = tmp_path_factory.mktemp(f"tokens-{request.param}")
    paths = {
        "tok": make_copied_adapter(
            base, root / "tok", target_modules=["q_proj"] if llama else ["c_attn"], trainable_token_indices=TOKENS
        ),
        "plain": make_copied_adapter(base, root / "plain", target_modules=["v_proj"] if llama else ["c_fc"]),
    }
    ids = torch.randint(0, 128, (len(ROWS), 6), generator=torch.Generator().manual_seed(7))
    ids[:, 1], ids[0, 3], ids[3, 4] = TOKENS[0], TOKENS[1], TOKENS[2]  # every row reads some new rows
    singles, halves = {}, {}
    with torch.no_grad():
        for name, path in paths.items():
            peft_model = load_peft(base, {name: path})
            singles[name], halves[name] = logits(peft_model, ids), logits(peft_model, ids[:3])
        singles[BASE] = logits(base, ids)
    for name in paths:
        assert (singles[name] - singles[BASE]).abs().max() > 1e-2, f"{name} must change the logits"
    noise = max((singles[name][:3] - halves[name]).abs().max().item() for name in paths)
    return dict(base=base, paths=paths, ids=ids, singles=singles, noise=noise, tied=not llama)


def test_trainable_tokens_mixed_batch_and_merged_match_peft(tokens):
    lora_model, registry = wrap_with(tokens["base"], tokens["paths"])
    slots = {BASE: BASE_SLOT, **{name: registry.acquire(name).slot for name in tokens["paths"]}}
    ids, singles = tokens["ids"], tokens["singles"]
    with torch.no_grad():
        ours_base = lora_model.model(ids).logits
    atol = tolerance(tokens["noise"], (ours_base - singles[BASE]).abs().max().item(), reference=singles[BASE])
    token_slots = torch.tensor([slots[name] for name in ROWS]).repeat_interleave(ids.shape[1])
    with lora_model.gather(lora_model.build_batch(token_slots)), torch.no_grad():
        ours = lora_model.model(ids).logits
    check_rows(ours, singles, ROWS, atol)
    assert (lora_model.model.lm_head in lora_model.copies.values()) == tokens["tied"], "tied: the head's rows too"
    merged = merged_logits(lora_model, ids, slots["tok"])
    torch.testing.assert_close(merged, singles["tok"], atol=atol, rtol=0)


def test_trainable_tokens_identity_and_bad_rows(tokens, tmp_path):
    lora_model, _ = wrap_with(tokens["base"], {})
    path = tokens["paths"]["tok"]
    adapter = load_adapter("tok", path, lora_model.spec, max_rank=64)
    tensors = load_file(path / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("trainable_tokens_delta"))
    for name, change in (("changed", tensors[key] + 1), ("short", tensors[key][:2])):
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_bytes((path / "adapter_config.json").read_bytes())
        save_file({**tensors, key: change.contiguous()}, out / "adapter_model.safetensors")
        if name == "changed":
            assert load_adapter("x", out, lora_model.spec, max_rank=64).identity != adapter.identity
        else:
            with pytest.raises(IncompatibleAdapterError) as info:
                load_adapter("x", out, lora_model.spec, max_rank=64)
            assert info.value.field == key.removeprefix("base_model.model.")
