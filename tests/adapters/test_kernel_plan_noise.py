"""A kernel plan measured under load is never cached as final (issue 28, item 3): the quiet check's
verdicts on controlled reference timings, the plan's retries and fallback, and what its cache file
records. The real-timing tests, through the CLI under a deliberate load, are in
tests/integration/test_kernels_cli.py."""

from __future__ import annotations

import json

import pytest
import torch

from adapters import kernel_plan, kernel_timing
from adapters.backends.cpu import cpu_model_name
from adapters.kernel_plan import MAX_ATTEMPTS, plan_for, weight_keys
from adapters.kernel_timing import NoisyMeasurement, measure
from adapters.kernels import PACKED, PLAIN, KernelRule
from adapters.quiet_check import MAX_PARALLEL_RATIO, MAX_SLOWDOWN, REFERENCE, Bracket, QuietCheck

QUIET, BUSY = (100e-6, 180e-6), (1000e-6, 180e-6)  # reference (all threads, one thread), seconds per call
RULE = KernelRule(PLAIN, PACKED, 16)


@pytest.fixture
def measured(monkeypatch) -> list:
    """Fake timings (plain for 1 row, packed from 16); the list records each weight measured."""
    calls = []

    def fake_measure(key, dtype, **_):
        calls.append(key)
        return {PLAIN: {1: 1, 16: 16, 64: 64}, PACKED: {1: 2, 16: 8, 64: 32}}

    monkeypatch.setattr(kernel_plan, "measure", fake_measure)
    return calls


def saved(plan) -> dict:
    return json.loads(plan.path.read_text())


def test_a_bracket_is_quiet_near_its_best_and_faster_than_one_thread(reference):
    check = QuietCheck()
    check.threads = 2
    assert check.is_quiet(check.bracket())  # 100 us on all threads, 180 on one
    assert not check.is_quiet(Bracket(100e-6 * (MAX_SLOWDOWN + 0.1), 1.0))  # slower than its best
    # A descheduled thread stalls the others: all threads slower than one, though near the run's best.
    assert not check.is_quiet(Bracket(100e-6, 100e-6 / (MAX_PARALLEL_RATIO + 0.1)))
    single_thread = QuietCheck()
    single_thread.threads = 1
    single_thread.bracket()
    assert single_thread.is_quiet(Bracket(100e-6, 50e-6))  # one thread: nothing to compare
    recorded = QuietCheck(recorded_best=50e-6)  # a quiet plan once saw 50 us here
    assert not recorded.is_quiet(recorded.bracket())


def test_a_quiet_measurement_is_cached_final_with_its_conditions(tiny_llama, tmp_path, reference, measured):
    keys = weight_keys(tiny_llama)
    plan = plan_for(keys, tiny_llama.dtype, tmp_path)
    assert plan.is_final and not plan.is_noisy and plan.rules == dict.fromkeys(keys, RULE)
    assert sorted(measured) == keys
    conditions = saved(plan)["conditions"]
    assert conditions["quiet"] is True and conditions["reference"] == REFERENCE
    assert conditions["reference_best_us"] == 100.0 and conditions["max_slowdown"] == 1.0
    assert conditions["brackets_us"] == [[100.0, 180.0]] * (len(keys) + 1)  # one between each two weights
    assert conditions["bounds"] == {"slowdown": MAX_SLOWDOWN, "parallel_ratio": MAX_PARALLEL_RATIO}
    assert {"threads", "measured_at", "seconds"} <= set(conditions)
    assert saved(plan)["identity"]["cpu"] == cpu_model_name()

    measured.clear()
    assert plan_for(keys, tiny_llama.dtype, tmp_path) == plan and measured == []  # final: read, not measured


def test_a_noisy_measurement_is_retried_a_bounded_number_of_times_then_left_provisional(
    tiny_llama, tmp_path, reference, measured
):
    keys = weight_keys(tiny_llama)
    reference.brackets = [QUIET, BUSY]  # load arrives during the first weight's measurement and stays
    plan = plan_for(keys, tiny_llama.dtype, tmp_path)
    assert plan.rules == {} and not plan.is_final and plan.is_noisy  # every weight runs the default
    assert measured == keys[:1]  # later tries found the load still there and measured nothing
    assert reference.calls == 2 + (MAX_ATTEMPTS - 1)  # opening, closing, then one opening per try
    conditions = saved(plan)["conditions"]
    assert conditions["quiet"] is False and conditions["max_slowdown"] == 10.0

    reference.brackets, reference.calls, measured[:] = [QUIET], 0, []  # the next start, on a quiet machine
    again = plan_for(keys, tiny_llama.dtype, tmp_path)
    assert sorted(measured) == keys and again.is_final and saved(again)["conditions"]["quiet"] is True


def test_load_that_passes_costs_one_weight_again_not_the_plan(tiny_llama, tmp_path, reference, measured):
    keys = weight_keys(tiny_llama)
    reference.brackets = [QUIET, BUSY, QUIET]  # a burst during the first weight, gone after the pause
    plan = plan_for(keys, tiny_llama.dtype, tmp_path)
    assert plan.is_final and measured == [keys[0], *keys]
    assert saved(plan)["conditions"]["max_slowdown"] == 1.0  # judged on the brackets it kept


def test_a_weight_is_abandoned_as_soon_as_the_reference_slows_down(tiny_llama, tmp_path, reference, monkeypatch):
    """Under load a call can stall for a scheduler tick, so finishing a doomed measurement can take
    minutes: the reference is asked every CHECK_SECONDS (here always) and the first no ends it."""
    monkeypatch.setattr(kernel_timing, "CHECK_SECONDS", 0)
    monkeypatch.setattr(kernel_timing, "COLD_BYTES", 1)  # one copy of each weight: fast
    answers = iter([True, True, False])
    with pytest.raises(NoisyMeasurement):
        measure(("dense", 32, 64), torch.float32, row_counts=(1,), num_repeats=5, still_quiet=lambda: next(answers))
    assert next(answers, "asked no more") == "asked no more"

    reference.brackets = [QUIET, QUIET, BUSY]  # opening, a check, then load
    keys = weight_keys(tiny_llama)
    plan = plan_for(keys, tiny_llama.dtype, tmp_path)
    assert plan.is_noisy and plan.rules == {} and saved(plan)["rules"] == []


def test_a_steady_load_is_caught_against_the_quiet_reference_recorded_on_this_machine(
    tiny_llama, tmp_path, reference, measured
):
    """A run that is slow from start to end has no spread of its own to show the load: the reference's
    best in a quiet plan of this machine (another model, same CPU and threads) does."""
    assert plan_for(weight_keys(tiny_llama), tiny_llama.dtype, tmp_path).is_final
    reference.brackets = [(3 * QUIET[0], 3 * QUIET[1])]  # three times slower throughout
    other_model = weight_keys(tiny_llama, "int8")
    plan = plan_for(other_model, tiny_llama.dtype, tmp_path)
    assert plan.is_noisy and saved(plan)["conditions"]["max_slowdown"] == 3.0
    assert not plan_for(other_model, tiny_llama.dtype, tmp_path / "elsewhere").is_noisy  # no record: no baseline


def test_a_noisy_refresh_keeps_the_final_plan(tiny_llama, tmp_path, reference, measured):
    keys = weight_keys(tiny_llama)
    final = plan_for(keys, tiny_llama.dtype, tmp_path)
    before = final.path.read_text()
    reference.brackets = [QUIET, BUSY]
    refreshed = plan_for(keys, tiny_llama.dtype, tmp_path, refresh=True)
    assert refreshed.is_noisy and refreshed.is_final and refreshed.rules == final.rules
    assert final.path.read_text() == before


def test_a_plan_cached_without_its_conditions_is_measured_again(tiny_llama, tmp_path, reference, measured):
    """Plans written before the quiet check (the poisoned one of issue 28 among them) are provisional."""
    keys = weight_keys(tiny_llama)
    path = plan_for(keys, tiny_llama.dtype, tmp_path).path
    old = json.loads(path.read_text())
    del old["conditions"]
    path.write_text(json.dumps(old))
    measured.clear()
    assert plan_for(keys, tiny_llama.dtype, tmp_path).is_final and sorted(measured) == keys
    assert "conditions" in json.loads(path.read_text())
