"""The GPU check cannot fail at the door (issue 25, item 1): what it imports is either in the GPU
image or carried, the engine imports without the HTTP stack, and its steps fit its budget. The
rehearsal itself (benchmarks/gpu_rehearse.sh: every step on this CPU, in a venv holding only the
image's packages and the carried wheels) is run by .ci/run beside this suite."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_closure  # noqa: E402

HTTP_STACK = {"fastapi", "starlette", "uvicorn", "python-multipart", "prometheus-client-fastapi"}


@pytest.fixture(scope="module")
def closure() -> set[str]:
    return gpu_closure.needed_distributions(gpu_closure.imported_modules())


def test_what_the_engine_needs_beyond_the_image_is_carried(closure):
    # structured output (llguidance), adapter-config regexes (re2), settings and params (pydantic)
    assert {"llguidance", "google-re2", "pydantic", "pydantic-core"} <= gpu_closure.to_carry(closure)
    assert not gpu_closure.to_carry(closure) & gpu_closure.image_packages()


def test_the_check_imports_no_http_stack(closure):
    assert not closure & HTTP_STACK, sorted(closure & HTTP_STACK)


def test_an_uncarried_import_is_seen(tmp_path, monkeypatch):
    # A test file of the check importing a package outside the image shows up as one to carry.
    probe = tmp_path / "test_probe.py"
    probe.write_text("import pydantic_settings\n\ndef test_nothing():\n    pass\n")
    monkeypatch.setattr(gpu_closure, "gpu_tests", lambda: [str(probe)])
    assert "pydantic-settings" in gpu_closure.needed_distributions(gpu_closure.imported_modules())


def test_the_steps_fit_the_budget():
    script = (ROOT / "benchmarks/gpu_run.sh").read_text()
    budget = int(re.search(r"BUDGET_S=\$\{BUDGET_S:-(\d+)\}", script).group(1))
    caps = [int(cap) for cap in re.findall(r"^step \w+ (\d+) ", script, flags=re.MULTILINE)]
    assert len(caps) >= 6 and sum(caps) <= budget, (caps, budget)
    assert budget <= 480
