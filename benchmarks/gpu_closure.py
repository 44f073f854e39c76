"""What the GPU check imports, as PyPI distributions: those the GPU image lacks are what it must carry.

The GPU machine has no network, and its image holds a fixed list of packages
(benchmarks/gpu_image_packages.txt, from the device tool's KINDS.md). A hand-written list of wheels
to carry went stale once (structured output added llguidance, and the check died at import), so the
list is derived instead: a fresh interpreter imports the check's scripts and collects the GPU test
files, as `gpu_run.sh` will, and every third-party top-level module it ends up with is mapped to its
distribution, if it is one that loraserve's declared dependencies (or the check's PEFT, pytest and
triton) require, directly or through others: an optional import that a library makes only because a
package happens to be installed here (transformers' `kernels`, torch's `dill`) is not carried.
Modules imported only later, while a step runs, are the rehearsal's to catch
(`gpu_rehearse.sh` runs every step in a venv holding only the image's packages and the carried wheels).

    python benchmarks/gpu_closure.py            # the distributions to carry, as name==version, one a line
    python benchmarks/gpu_closure.py --image    # those the image provides (the rehearsal installs them)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires, version
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
CHECK_SCRIPTS = ["benchmarks/cuda_check.py", "benchmarks/throughput.py"]
TESTS_FILE = ROOT / "benchmarks/gpu_tests.txt"  # the CUDA tests gpu_run.sh runs, shared with it
IMAGE_FILE = ROOT / "benchmarks/gpu_image_packages.txt"
CHECK_ROOTS = {"loraserve", "peft", "pytest", "triton"}  # the project's own requirements, and the check's
FIRST_PARTY = {"server", "adapters", "client", "support", "conftest", "tests", "benchmarks"}
_MARK = "GPU-CLOSURE-MODULES:"

_PROBE = """
import importlib.util, json, os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")  # the check's CPU smoke runs set it before triton loads
for i, path in enumerate(SCRIPTS):
    spec = importlib.util.spec_from_file_location(f"_gpu_check_{i}", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
import pytest
code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *TESTS])
assert code == 0, f"collecting the GPU tests failed: {code}"
print(MARK + json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def normalize(name: str) -> str:
    """PEP 503's form of a distribution name: what pip and the image list compare."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    lines = IMAGE_FILE.read_text().splitlines()
    return {normalize(line) for line in lines if line.strip() and not line.startswith("#")}


def gpu_tests() -> list[str]:
    return TESTS_FILE.read_text().split()


def imported_modules(python: str = sys.executable) -> set[str]:
    """Top-level modules a fresh `python` holds after importing the check as gpu_run.sh does."""
    probe = f"SCRIPTS = {CHECK_SCRIPTS!r}\nTESTS = {gpu_tests()!r}\nMARK = {_MARK!r}\n" + _PROBE
    # No pytest plugins from this venv's entry points: the GPU image's pytest has its own.
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = subprocess.run([python, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    line = next((line for line in result.stdout.splitlines() if line.startswith(_MARK)), None)
    if result.returncode != 0 or line is None:
        raise RuntimeError(f"importing the GPU check failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return set(json.loads(line.removeprefix(_MARK)))


def needed_distributions(modules: set[str]) -> set[str]:
    """The third-party distributions (normalized names) that provide `modules`."""
    owners = packages_distributions()
    third_party = modules - set(sys.stdlib_module_names) - FIRST_PARTY - set(sys.builtin_module_names)
    return {normalize(dist) for module in third_party for dist in owners.get(module, [])}


def required_distributions(roots: set[str]) -> set[str]:
    """Every distribution `roots` require, transitively, without extras (markers as on this Python)."""
    seen, todo = set(), [normalize(root) for root in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            declared = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in declared:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(normalize(requirement.name))
    return seen


def to_carry(needed: set[str]) -> set[str]:
    """The needed distributions the image lacks, less optional imports nothing requires."""
    return needed & required_distributions(CHECK_ROOTS) - image_packages()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", action="store_true", help="list the needed distributions the image provides")
    args = parser.parse_args()
    needed = needed_distributions(imported_modules())
    chosen = needed & image_packages() if args.image else to_carry(needed)
    for name in sorted(chosen):
        print(f"{name}=={version(name)}")


if __name__ == "__main__":
    main()
