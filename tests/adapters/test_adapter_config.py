"""adapter_config.json as untrusted input: regexes that cannot be run or would never finish, and
fields that change the outputs in ways we do not serve."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest

from adapters import InvalidAdapterError, LoraConfig, UnsupportedAdapterError, wrap_model
from adapters.config import CONFIG_FILE, INFERENCE_NEUTRAL, REFUSED, SUPPORTED
from adapters.peft_format import load_adapter
from server.http.errors import status_and_code

BASE = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
MODULE = "model.layers.1.self_attn.q_proj"


def parse(**fields) -> LoraConfig:
    return LoraConfig.from_json(json.dumps({**BASE, **fields}))


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(target_modules="("), "target_modules"),
        (dict(exclude_modules="("), "exclude_modules"),
        (dict(layers_to_transform=[0], layers_pattern="("), "layers_pattern"),
        (dict(layers_to_transform=[0], layers_pattern=["layers", "("]), "layers_pattern"),
        (dict(rank_pattern={"(": 2}), "rank_pattern.("),
        (dict(alpha_pattern={"(": 2}), "alpha_pattern.("),
        (dict(target_modules=r"(?=.*q_proj).*"), "target_modules"),  # valid for `re`, but no lookarounds in RE2
        (dict(rank_pattern={r"(q)_proj\1": 2}), r"rank_pattern.(q)_proj\1"),  # nor backreferences
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_a_regex_we_cannot_run_is_an_invalid_adapter_naming_the_field(fields, field):
    with pytest.raises(InvalidAdapterError) as caught:
        parse(**fields)
    assert (caught.value.file, caught.value.field) == (CONFIG_FILE, field)
    assert status_and_code(caught.value)[0] == 400


def test_regexes_keep_peft_semantics():
    config = parse(
        target_modules=r".*\.(q|v)_proj",
        exclude_modules=r".*layers\.0\..*",
        rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
        alpha_pattern={"v_proj": 3},
    )
    assert config.targets(MODULE) and not config.targets("model.layers.0.self_attn.q_proj")
    assert not config.targets("model.layers.1.self_attn.k_proj")
    assert (config.rank_for(MODULE), config.rank_for("model.layers.1.self_attn.v_proj")) == (2, 6)
    assert config.rank_for("model.layers.1.mlp.up_proj") == 4
    assert config.scale_for("model.layers.1.self_attn.v_proj") == 3 / 6
    layered = parse(layers_to_transform=[1], layers_pattern="layers")
    assert layered.targets(MODULE) and not layered.targets("model.layers.0.self_attn.q_proj")


CATASTROPHIC = r"(.|.)*X"  # exponential backtracking in Python's re; linear in RE2
LONG_NAME = "model." + "a" * 60


def test_a_catastrophic_regex_finishes():
    """Run in a child, so that a regression fails at the timeout instead of hanging the suite."""
    code = textwrap.dedent(f"""
        import json
        from adapters import LoraConfig
        base = {json.dumps(BASE)}
        for fields in (dict(target_modules={CATASTROPHIC!r}), dict(exclude_modules={CATASTROPHIC!r}),
                       dict(rank_pattern={{{CATASTROPHIC!r}: 2}}, alpha_pattern={{{CATASTROPHIC!r}: 2}}),
                       dict(layers_to_transform=[0], layers_pattern={CATASTROPHIC!r})):
            config = LoraConfig.from_json(json.dumps({{**base, **fields}}))
            config.targets({LONG_NAME!r} + ".q_proj"), config.targets({LONG_NAME!r})
            config.rank_for({LONG_NAME!r}), config.scale_for({LONG_NAME!r})
        print("finished")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "finished"


@pytest.mark.parametrize(
    "field, value",
    [
        ("layer_replication", [[0, 2], [1, 2]]),
        ("init_lora_weights", "pissa"),
        ("alora_invocation_tokens", [1, 2, 3]),
        ("use_qalora", True),
        ("future_knob", 1),  # in no list: it might change the outputs
    ],
)
def test_a_field_that_changes_the_outputs_is_refused_by_name(field, value):
    with pytest.raises(UnsupportedAdapterError) as caught:
        parse(**{field: value})
    assert (caught.value.file, caught.value.field, status_and_code(caught.value)[0]) == (CONFIG_FILE, field, 422)


@pytest.mark.parametrize(
    "fields",
    [
        dict(lora_dropout=0.1),
        dict(task_type="CAUSAL_LM"),
        dict(init_lora_weights="gaussian"),
        dict(inference_mode=True),
        dict(runtime_config={"ephemeral_gpu_offload": True}),
        dict(layer_replication=None, future_knob=None),  # refused features, left off
    ],
    ids=lambda fields: ",".join(fields),
)
def test_a_field_that_does_not_change_the_outputs_is_accepted(fields):
    assert parse(**fields).targets(MODULE)


def test_dora_with_lora_bias_is_refused_as_peft_refuses_it():
    with pytest.raises(UnsupportedAdapterError) as caught:
        parse(use_dora=True, lora_bias=True)
    assert (caught.value.file, caught.value.field) == (CONFIG_FILE, "lora_bias")


def test_every_field_of_peft_lora_config_is_classified_once():
    groups = [SUPPORTED, INFERENCE_NEUTRAL, set(REFUSED)]
    assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])
    unclassified = {f.name for f in dataclasses.fields(peft.LoraConfig)} - set().union(*groups)
    assert not unclassified, f"classify these new PEFT fields in adapters/config.py: {unclassified}"


def test_docs_table_names_every_classified_field():
    """The table names every field the parser classifies: those of the PEFT installed (checked
    above) and of the other releases served (PEFT 0.22's astra_config, under 0.21)."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "peft-compatibility.md").read_text()
    table = doc[doc.index("### Every PEFT `LoraConfig` field") :]
    table = table[: table.index("\n## ")]
    rows = [line.split("|")[1] for line in table.splitlines() if line.startswith("| `")]
    named = {name.strip(" `") for row in rows for name in row.split(",")}
    assert named == set().union(SUPPORTED, INFERENCE_NEUTRAL, REFUSED)


def test_a_config_saved_by_peft_with_its_defaults_is_accepted():
    saved = peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM").to_dict()
    config = LoraConfig.from_json(json.dumps(saved, default=sorted))
    assert config.targets(MODULE) and config.r == 4


NAME_LISTS = [["q_proj"], ["self_attn.q_proj"], [MODULE], ["proj"], ["_proj"], ["1.self_attn"], ["b"], ["", "x"]]
KEYS = [MODULE, "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "q_proj", "a..b", "a.b"]


@pytest.mark.parametrize("names", NAME_LISTS, ids=str)
def test_name_lists_match_as_peft_matches_them(names):
    for key in KEYS:
        assert parse(target_modules=names).targets(key) == _peft_selects(key, names), key
        excluded = parse(target_modules=["q_proj", "up_proj"], exclude_modules=names)
        assert excluded.targets(key) == (_peft_selects(key, ["q_proj", "up_proj"]) and not _peft_selects(key, names))


def _peft_selects(key: str, names: list[str]) -> bool:
    """peft.tuners.tuners_utils.check_target_module_exists on a list of names."""
    return any(key == t or key.endswith("." + t) for t in names)


def test_a_repeated_target_list_is_read_once(tiny_llama, tmp_path, make_peft_adapter, monkeypatch):
    """A config repeating one name 16,000 times cost a scan of the list per module per entry, so
    quadratic in the list's length. Its names are now read once and matched through a set: the
    matches per module do not depend on the list's length (counted here, not timed)."""
    path = make_peft_adapter(tiny_llama, tmp_path / "repeated", r=4, target_modules=["q_proj", "v_proj"])
    config = json.loads((path / CONFIG_FILE).read_text())
    config |= {"target_modules": ["q_proj"] * 16_000 + ["v_proj"], "exclude_modules": ["k_proj"] * 16_000}
    (path / CONFIG_FILE).write_text(json.dumps(config))
    calls = []
    targets = LoraConfig.targets
    monkeypatch.setattr(LoraConfig, "targets", lambda self, key: calls.append(key) or targets(self, key))
    spec = wrap_model(copy.deepcopy(tiny_llama), max_loras=1, max_rank=8).spec
    adapter = load_adapter("repeated", path, spec, max_rank=8)
    assert adapter.config.target_modules == ["q_proj", "v_proj"] and adapter.config.exclude_modules == ["k_proj"]
    assert len(calls) <= 3 * len(spec.module_names), len(calls)  # was 16,000 per q_proj module
