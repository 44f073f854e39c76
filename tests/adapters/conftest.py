"""Fixtures of the adapter tests: a stand-in for the kernel plan's quiet reference."""

from __future__ import annotations

import pytest

from adapters import kernel_plan, quiet_check


class FakeReference:
    """Stands in for quiet_check.time_reference: bracket i times (threaded, single) seconds per call
    in every sample, from `brackets[i]`, the last repeating."""

    def __init__(self):
        self.brackets = [(100e-6, 180e-6)]  # quiet: one thread takes longer than all of them
        self.calls = 0

    def __call__(self, threads: int) -> tuple[list[float], list[float]]:
        threaded, single = self.brackets[min(self.calls, len(self.brackets) - 1)]
        self.calls += 1
        return [threaded] * quiet_check.NUM_SAMPLES, [single] * quiet_check.NUM_SAMPLES


@pytest.fixture
def reference(monkeypatch) -> FakeReference:
    """A machine as quiet as the test says (timing the real reference on a shared machine is not)."""
    fake = FakeReference()
    monkeypatch.setattr(quiet_check, "time_reference", fake)
    monkeypatch.setattr(kernel_plan, "PAUSE_SECONDS", 0)
    return fake
