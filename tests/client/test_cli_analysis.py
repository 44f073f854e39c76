"""`loraserve adapters compress | inspect | compare` as a user runs them: real subprocesses, against
a real server for the two that ask one; the figures are real PNG files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from support.analysis import low_rank_adapter
from support.http import adapter_files

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(sys.executable).parent / "loraserve"
COMMAND = [str(SCRIPT)] if SCRIPT.is_file() else [sys.executable, "-m", "server.http.cli"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(*args: str, command=COMMAND) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(Path.home())},
    )


def test_offline_compress_writes_a_peft_directory(tiny_llama, tmp_path, make_peft_adapter):
    source = low_rank_adapter(tiny_llama, tmp_path / "r32", make_peft_adapter, target_modules=["q_proj", "v_proj"])
    done = _run("adapters", "compress", str(source), str(tmp_path / "r4"), "--energy", "0.9999")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["rank_before"], report["rank"]) == (32, 4)
    config = json.loads((tmp_path / "r4" / "adapter_config.json").read_text())
    assert config["r"] == 4 and set(config["rank_pattern"].values()) == {4}
    tensors = load_file(tmp_path / "r4" / "adapter_model.safetensors")
    assert {t.shape[0] for k, t in tensors.items() if ".lora_A." in k} == {4}


def test_offline_compress_names_a_bad_field(tiny_llama, tmp_path, make_peft_adapter):
    source = make_peft_adapter(tiny_llama, tmp_path / "a", r=4, target_modules=["q_proj"])
    done = _run("adapters", "compress", str(source), str(tmp_path / "out"), "--energy", "1.5")
    assert done.returncode == 1 and "energy" in done.stderr, done.stderr


@pytest.mark.real_model
def test_inspect_and_compare_print_tables_and_draw(tmp_path, adapter_dirs, plain_server):
    for name in ("alpha", "beta"):
        response = httpx.post(
            f"{plain_server.url}/v1/adapters", data={"name": name}, files=adapter_files(adapter_dirs[name]), timeout=60
        )
        assert response.status_code == 201, response.text
    inspect = _run("adapters", "inspect", "alpha", "--url", plain_server.url, "--plot", str(tmp_path / "alpha.png"))
    assert inspect.returncode == 0, inspect.stderr
    rows = [line for line in inspect.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 60 and rows[0].split()[:2] == ["model.layers.0.self_attn.q_proj", "8"]
    compare = _run(
        "adapters", "compare", "alpha", "beta", "--url", plain_server.url, "--plot", str(tmp_path / "compare.png")
    )
    assert compare.returncode == 0, compare.stderr
    assert sum(line.startswith("model.layers.") for line in compare.stdout.splitlines()) == 60
    for figure in ("alpha.png", "compare.png"):
        assert (tmp_path / figure).read_bytes()[:8] == PNG_MAGIC
    missing = _run("adapters", "inspect", "nope", "--url", plain_server.url)
    assert missing.returncode == 1 and "nope" in missing.stderr
    # without the plot extra: the table still prints, and the error says what to install
    no_matplotlib = [
        sys.executable,
        "-c",
        "import sys; sys.modules['matplotlib'] = None; from server.http.cli import main; sys.exit(main())",
    ]
    done = _run(
        "adapters",
        "inspect",
        "alpha",
        "--url",
        plain_server.url,
        "--plot",
        str(tmp_path / "x.png"),
        command=no_matplotlib,
    )
    assert done.returncode == 1 and "loraserve[plot]" in done.stderr, done.stderr
    assert not (tmp_path / "x.png").exists()
