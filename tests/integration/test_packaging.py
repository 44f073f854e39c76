"""`adapters` is this repo's package (PyPI has an unrelated one of that name), and the import
boundaries hold: `client` pulls in neither torch nor `server`; `adapters` does not pull in `server`."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import adapters

REPO = Path(__file__).resolve().parents[2]


def test_adapters_is_this_repos_package():
    assert Path(adapters.__file__).resolve() == REPO / "adapters" / "__init__.py"
    assert callable(adapters.wrap_model) and callable(adapters.AdapterRegistry)
    assert set(importlib.metadata.packages_distributions()["adapters"]) == {"loraserve"}


def imported_after(statement: str, cwd: Path) -> tuple[set[str], dict]:
    """Top-level modules loaded by a fresh interpreter (outside the repo) after `statement`."""
    code = (
        f"import sys, json\n{statement}\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'files': {name: getattr(sys.modules[name], "
        "'__file__', None) for name in ('adapters', 'client') if name in sys.modules}}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    return {name.split(".")[0] for name in report["modules"]}, report["files"]


def test_client_imports_neither_torch_nor_server(tmp_path):
    modules, files = imported_after("import client", tmp_path)
    assert Path(files["client"]).resolve().is_relative_to(REPO)
    assert "torch" not in modules and "server" not in modules


def test_adapters_does_not_import_server(tmp_path):
    modules, files = imported_after("import adapters", tmp_path)
    assert Path(files["adapters"]).resolve() == REPO / "adapters" / "__init__.py"
    assert "torch" in modules  # the probe sees real imports
    assert "server" not in modules


def test_engine_does_not_import_http(tmp_path):
    """The engine ends where HTTP begins: nothing under server.engine pulls in server.http or FastAPI."""
    code = (
        "import pkgutil, importlib, server.engine\n"
        "for info in pkgutil.iter_modules(server.engine.__path__):\n"
        "    importlib.import_module('server.engine.' + info.name)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "server.engine.llm_engine" in modules  # the probe really imported the engine
    assert not {m for m in modules if m.startswith("server.http")}
    assert "fastapi" not in modules and "starlette" not in modules


def test_http_reaches_the_engine_only_through_the_async_engine_facade():
    """server/http uses AsyncEngine's public methods, never the LLMEngine it wraps."""
    reaching = re.compile(r"engine(\(\))?\._?engine\b")  # engine.engine, ready_engine()._engine, ...
    offenders = [
        f"{path.name}:{number}"
        for path in sorted((REPO / "server" / "http").glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if reaching.search(line)
    ]
    assert offenders == []
