"""Base kernels chosen per machine: the decision from timings (injected, and one real measurement),
its cache under the cache dir, forced choices, and equal outputs whichever kernel runs."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch

from adapters import kernel_plan, kernel_timing, native, wrap_model
from adapters.backends.cpu import PackedLinear, cpu_model_name
from adapters.kernel_plan import decide, weight_keys
from adapters.kernel_timing import ROW_COUNTS, measure
from adapters.kernels import (
    DEQUANTIZED,
    INT8,
    INT8_ROWS,
    PACKED,
    PLAIN,
    KernelPlan,
    KernelRule,
    PlainLinear,
    RowSwitch,
)
from support.engine import make_engine

pytestmark = pytest.mark.usefixtures("reference")  # a quiet machine: the plan measured here is final


def timings(**by_kernel: tuple[float, float, float]) -> dict:
    """kernel=(seconds at 1, 16, 64 rows)."""
    return {kernel: dict(zip(ROW_COUNTS, values)) for kernel, values in by_kernel.items()}


@pytest.mark.parametrize(
    "measured, rule",
    [
        (timings(plain=(30, 360, 950), packed=(14, 150, 330)), KernelRule.single(PACKED)),  # packed wins everywhere
        (timings(plain=(10, 100, 300), packed=(10.1, 99, 301)), KernelRule.single(PLAIN)),  # a tie: no extra copy
        (timings(plain=(8.9, 110, 400), packed=(10, 100, 330)), KernelRule(PLAIN, PACKED, 16)),  # plain for 1 row only
        (timings(plain=(9.9, 100, 300), packed=(10, 80, 250)), KernelRule.single(PACKED)),  # a split not worth 3%
        (timings(int8=(12, 118, 470), dequantized=(176, 203, 310)), KernelRule(INT8, DEQUANTIZED, 64)),
        (timings(plain=(10, 100, 300), packed=(8, 100, 400)), KernelRule(PACKED, PLAIN, 16)),  # either order
    ],
)
def test_the_decision_follows_the_timings_and_is_deterministic(measured, rule):
    assert decide(measured) == rule
    assert decide(json.loads(json.dumps(measured), object_hook=_int_keys)) == rule  # as read back from a cache


def test_a_kernel_not_measured_at_a_row_count_is_never_run_there(tmp_path):
    """Ours (int8-rows) is timed up to 16 rows only: a rule may run it below 64 rows, never from there."""
    assert native.load_row_kernels(tmp_path), "the int8 row kernel did not build"
    measured = measure(("int8", 32, 64), torch.float32, num_repeats=2)
    assert 64 not in measured[INT8_ROWS] and {1, 16} <= set(measured[INT8_ROWS])
    assert set(measured[INT8]) == set(measured[DEQUANTIZED]) == set(ROW_COUNTS)
    fastest_everywhere = {
        INT8: {1: 12, 16: 118, 64: 470},
        INT8_ROWS: {1: 6, 16: 100},
        DEQUANTIZED: {1: 176, 16: 203, 64: 310},
    }
    assert decide(fastest_everywhere) == KernelRule(INT8_ROWS, DEQUANTIZED, 64)


def test_a_real_measurement_on_a_tiny_shape_gives_a_rule_for_its_candidates():
    measured = measure(("dense", 32, 64), torch.float32, row_counts=(1, 16), num_repeats=3)
    assert set(measured) == {PLAIN, PACKED} and all(t > 0 for by_rows in measured.values() for t in by_rows.values())
    assert decide(measured).kernels <= {PLAIN, PACKED}


def test_timings_read_the_weight_from_memory_not_cache(monkeypatch):
    """Each timed call runs on the next of enough distinct copies of the weight to fill COLD_BYTES,
    as a forward over many layers reads each weight cold; timing one weight kept in cache picked
    MKL for one-row calls on the AMD box, and halved one-stream decode in the real model."""
    weight_bytes = 32 * 64 * 4
    monkeypatch.setattr(kernel_timing, "COLD_BYTES", 5 * weight_bytes)
    built, make = [], kernel_timing._kernel

    def spy(kind, name, weight, dtype):
        built.append((name, weight.data_ptr()))
        return make(kind, name, weight, dtype)

    monkeypatch.setattr(kernel_timing, "_kernel", spy)
    measure(("dense", 32, 64), torch.float32, row_counts=(1,), num_repeats=1)
    for name in (PLAIN, PACKED):
        assert len({ptr for kernel, ptr in built if kernel == name}) == 5  # five distinct copies each

    order = []
    copies = [lambda x, i=i: order.append(i) for i in range(3)]
    kernel_timing._time(copies, torch.zeros(1, 4), 7)
    assert order == [0, 1, 2, 0, 1, 2, 0]
    assert kernel_timing._calls_per_sample({"k": copies}, torch.zeros(1, 4)) >= len(copies)  # a full pass at least


def test_the_plan_is_measured_once_per_machine_then_read_from_the_cache(tiny_llama, tmp_path, monkeypatch, caplog):
    calls = []

    def fake_measure(key, dtype, **_):
        calls.append(key)
        return timings(plain=(1, 16, 64), packed=(2, 8, 32))  # plain for 1 row, packed from 16

    monkeypatch.setattr(kernel_plan, "measure", fake_measure)
    caplog.set_level(logging.INFO, logger=kernel_plan.__name__)
    first = kernel_plan.plan_kernels(tiny_llama, None, tmp_path)
    assert sorted(calls) == weight_keys(tiny_llama) and set(first.values()) == {KernelRule(PLAIN, PACKED, 16)}
    assert "measured" in caplog.text and "plain below 16 rows, then packed" in caplog.text
    (cached,) = (tmp_path / "kernels").glob("*.json")
    assert json.loads(cached.read_text())["identity"]["cpu"] == cpu_model_name()

    calls.clear()
    assert kernel_plan.plan_kernels(tiny_llama, None, tmp_path) == first and calls == []
    assert kernel_plan.plan_kernels(tiny_llama, "int8", tmp_path) and calls  # other weights: another entry
    cached.write_text("{not json")
    calls.clear()
    assert kernel_plan.plan_kernels(tiny_llama, None, tmp_path) == first and calls  # damaged: measured again


@pytest.mark.parametrize(
    "config, rule",
    [
        (dict(kernel_choice="packed"), KernelRule.single(PACKED)),
        (dict(kernel_choice="plain"), KernelRule.single(PLAIN)),
        (dict(kernel_choice="auto"), KernelRule(PLAIN, PACKED, 16)),
    ],
)
def test_a_forced_choice_is_honoured(config, rule, tmp_path, monkeypatch):
    """Each linear runs its weights by the rule (sibling linears may share one fused matmul built by it)."""
    monkeypatch.setattr(kernel_plan, "measure", lambda key, dtype, **_: timings(plain=(1, 16, 64), packed=(2, 8, 32)))
    engine = make_engine(cache_dir=tmp_path, **config)
    embedding = engine.lora_model.model.get_input_embeddings()
    assert all(layer.dense_rule == rule for layer in engine.lora_model.layers.values() if layer is not embedding)
    assert isinstance(
        engine.lora_model.model.lm_head.kernel,
        {PACKED: PackedLinear, PLAIN: PlainLinear}.get(rule.large if len(rule.kernels) == 1 else None, RowSwitch),
    )


@torch.no_grad()
def test_outputs_agree_whichever_kernel_runs(tiny_llama, token_ids):
    """A split rule runs packed for the 24-row call and plain for the 1-row one: both equal plain
    F.linear within fp32 noise (bf16 kernels against each other: test_packed.py)."""
    plan = {key: KernelRule(PLAIN, PACKED, 4) for key in weight_keys(tiny_llama)}
    switched = wrap_model(copy.deepcopy(tiny_llama), kernels=KernelPlan(PACKED, plan))
    plain = wrap_model(copy.deepcopy(tiny_llama))
    assert isinstance(switched.model.lm_head.kernel, RowSwitch)
    for ids in (token_ids[:1, :1], token_ids):
        torch.testing.assert_close(switched.model(ids).logits, plain.model(ids).logits)


def _int_keys(mapping: dict) -> dict:
    return {int(k) if k.isdigit() else k: v for k, v in mapping.items()}
