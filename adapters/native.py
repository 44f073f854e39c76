"""Kernels of our own in C++ (row_kernels.cpp, block_kernels.cpp), built on the serving machine the
first time they are needed.

One-row GEMVs (why no library kernel serves: the sources' headers): `int8_rows` for int8 weights
(`int8_rows_group` for several that read the same input), `dense_rows` for float32 and bfloat16 ones
(the compiled decode step's bf16 head), `q4_1_rows` and `q8_0_rows` for weights in blocks.py's
blocks (several weights that read the same input a call). They are
compiled with the machine's own C++ compiler for its own CPU (`-march=native`), as inductor does for
the compiled decode step, and loaded as torch ops, so that eager kernels and compiled graphs call
them alike. The shared library is cached under
<cache dir>/native, keyed by the source, torch's version, the compiler and the CPU's flags: a first
start pays ~10-15 s of compiling, later ones load it. Where no compiler is found or the build fails,
`load_row_kernels` says why in the log and returns False: int8 weights keep aten's kernels, and the
compiled step its own reductions.
LORASERVE_NATIVE_FLAGS adds compiler flags after `-march=native` (a build for older CPUs than this
one, e.g. `-mno-avx512f`; the tests build the AVX2 and scalar loops so).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from torch.utils import cpp_extension

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name) for name in ("row_kernels.cpp", "block_kernels.cpp"))
FLAGS_VARIABLE = "LORASERVE_NATIVE_FLAGS"
BUILD_TIMEOUT_S = 300
_loaded: Path | None = None  # the library this process loaded (one per process: it registers the op)


def load_row_kernels(cache_dir: Path) -> bool:
    """Make the ops of `torch.ops.loraserve_native` available (building them once per machine);
    False, logged, where they cannot be built here."""
    global _loaded
    if _loaded is not None:
        return True
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        log.warning("no row kernels of ours: no C++ compiler (g++) to build them (%s)", FALLBACK)
        return False
    library = cache_dir / "native" / f"row_kernels-{_build_key(compiler)}.so"
    if not library.exists():
        try:
            _build(compiler, library)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("no row kernels of ours: building them failed (%s): %s", FALLBACK, exc)
            return False
    torch.ops.load_library(str(library))
    torch.library.register_fake("loraserve_native::int8_rows")(_rows_shape)
    torch.library.register_fake("loraserve_native::int8_rows_group")(_group_shapes)
    torch.library.register_fake("loraserve_native::dense_rows")(_rows_shape)
    for kind in ("q4_1", "q8_0"):
        torch.library.register_fake(f"loraserve_native::{kind}_rows")(_blocks_shapes)
    _loaded = library
    log.info("row kernels: %s (%s)", _VECTORS.get(vector_bits(), "scalar loop"), library)
    return True


_VECTORS = {512: "AVX-512 loop", 256: "AVX2 loop"}
FALLBACK = "int8 weights run aten's kernels, the compiled step its own reductions, q4_1 is refused"


def vector_bits() -> int:
    """The loaded kernel's vector width in bits (0: scalar loop)."""
    return torch.ops.loraserve_native.vector_bits()


def int8_rows_op():
    """The loaded op (x [.., K], q [N, K] int8, scales [N], bias [N] | None -> [.., N] in x's dtype), or None."""
    return torch.ops.loraserve_native.int8_rows.default if _loaded is not None else None


def int8_rows_group_op():
    """The loaded op (x [.., K], qs: int8 [N_i, K] each, scales: float32 [N_i] each -> one [.., N_i]
    in x's dtype each, int8_rows's without a bias) for weights that read the same x, or None."""
    return torch.ops.loraserve_native.int8_rows_group.default if _loaded is not None else None


def dense_rows_op():
    """The loaded op (x [.., K], weight [N, K] float32 or bfloat16, bias [N] | None -> [.., N] in
    x's dtype), or None."""
    return torch.ops.loraserve_native.dense_rows.default if _loaded is not None else None


def block_rows_op(kind: str):
    """The loaded op for blocks.py's `kind` (x [.., K], blocks: uint8 [N_i / 16, K / 32, bytes] each
    -> one [.., N_i] in x's dtype each: block_kernels.cpp), or None."""
    return getattr(torch.ops.loraserve_native, f"{kind}_rows").default if _loaded is not None else None


def dequantize_blocks_op():
    """The loaded op (blocks [N / 16, K / 32, bytes] uint8, out [N, K] float32, bfloat16 or float16:
    the blocks' values into `out`), or None."""
    return torch.ops.loraserve_native.dequantize_blocks.default if _loaded is not None else None


def _blocks_shapes(x, blocks):
    return [x.new_empty((*x.shape[:-1], b.shape[0] * 16)) for b in blocks]


def _rows_shape(x, weight, *rest):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _group_shapes(x, qs, scales):
    return [x.new_empty((*x.shape[:-1], q.shape[0])) for q in qs]


def _build_key(compiler: str) -> str:
    parts = (
        *(source.read_bytes() for source in SOURCES),
        torch.__version__,
        compiler,
        _extra_flags(),
        platform.machine(),
        _cpu_flags(),
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def _extra_flags() -> list[str]:
    return shlex.split(os.environ.get(FLAGS_VARIABLE, ""))


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for); a library built for others is not reused."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str, library: Path) -> None:
    """Compile into a temporary file and rename it into place: replicas starting together on one
    cache directory each build, and none loads a half-written library."""
    library.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log.info("building our row kernels (C++, once per machine: ~10-15 s) into %s", library.parent)
    include = cpp_extension.include_paths()
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    with tempfile.NamedTemporaryFile(dir=library.parent, suffix=".so", delete=False) as staging:
        command = [
            compiler, "-O3", "-march=native", *_extra_flags(), "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{path}" for path in include), *map(str, SOURCES),
            f"-L{cpp_extension.TORCH_LIB_PATH}", "-ltorch", "-ltorch_cpu", "-lc10", "-o", staging.name,
        ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip().splitlines()[-1] if done.stderr else done.returncode)
        os.replace(staging.name, library)
    finally:
        Path(staging.name).unlink(missing_ok=True)
    log.info("built the row kernels in %.1f s", time.perf_counter() - started)
