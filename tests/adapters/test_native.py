"""Our one-row kernels (adapters/row_kernels.cpp, block_kernels.cpp, built and loaded by adapters/native.py):
`dense_rows`'s contract and `int8_rows_group` here, `int8_rows`'s contract in test_quantization.py, the
block kernels' in test_blocks.py, and all of them in the narrower loops other CPUs build."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest
import torch

from adapters import native
from adapters.kernels import Int8Weight

FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def dense_rows(tmp_path_factory):
    assert native.load_row_kernels(tmp_path_factory.mktemp("native-cache")), "our row kernels did not build"
    return native.dense_rows_op()


def dense_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out_dtype: torch.dtype):
    """(exact x·Wᵀ + b in float64, the most a float32 sum of its products rounded once to
    `out_dtype` may differ from it)."""
    x64, w64 = x.double(), weight.double()
    exact = x64 @ w64.T + bias.double()
    sums = x.shape[-1] * FP32_EPS * (x64.abs() @ w64.abs().T + bias.double().abs())
    return exact, sums + torch.finfo(out_dtype).eps / 2 * exact.abs() + 1e-30


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_features", [576, 72])  # 72: a tail past the vector loop's blocks of 64 or 32
def test_dense_rows_sums_in_float32_and_rounds_once_to_the_activations_dtype(
    dense_rows, weight_dtype, dtype, in_features
):
    """float32 products and sums, the bias added before the one rounding; leading dimensions kept."""
    weight = (torch.randn(300, in_features) * 0.05).to(weight_dtype)
    bias, x = torch.randn(300).to(dtype), torch.randn(2, 3, in_features).to(dtype)
    got = dense_rows(x, weight, bias)
    assert got.dtype == dtype and got.shape == (2, 3, 300)
    exact, bound = dense_bound(x, weight, bias, dtype)
    assert ((got.double() - exact).abs() <= bound).all()
    assert torch.equal(dense_rows(x, weight, None), dense_rows(x, weight, torch.zeros(300, dtype=dtype)))


def test_dense_rows_refuses_a_weight_it_has_no_loop_for(dense_rows):
    with pytest.raises(RuntimeError, match="float32 or bfloat16 weight"):
        dense_rows(torch.randn(1, 64), torch.randn(8, 64).half(), None)
    with pytest.raises(RuntimeError, match="x's last dimension 63 is not the weight's 64"):
        dense_rows(torch.randn(1, 63), torch.randn(8, 64), None)


def test_int8_rows_group_equals_int8_rows_per_weight(dense_rows):
    """One call for weights on the same input (q/k/v), each output what int8_rows gives it alone."""
    weights = [Int8Weight.quantize(torch.randn(n, 576) * 0.02) for n in (576, 192, 192)]
    x = torch.randn(1, 1, 576).bfloat16()
    grouped = native.int8_rows_group_op()(x, [w.q for w in weights], [w.float_scales for w in weights])
    for y, w in zip(grouped, weights, strict=True):
        assert y.shape == (1, 1, w.q.shape[0]) and torch.equal(y, native.int8_rows_op()(x, w.q, w.float_scales, None))
    other = Int8Weight.quantize(torch.randn(8, 64))
    with pytest.raises(RuntimeError, match="read the same input: K 576 and 64"):
        native.int8_rows_group_op()(x, [weights[0].q, other.q], [weights[0].float_scales, other.float_scales])


NARROWER_BUILD_CHECK = """
import sys, torch
from pathlib import Path
from adapters import native
from adapters.blocks import BlockWeight
from adapters.kernels import Int8Weight
sys.path.insert(0, sys.argv[2])
from test_blocks import block_bound
from test_native import dense_bound
assert native.load_row_kernels(Path(sys.argv[1]))
worst = 0.0
for rows, in_features, dtype in [(1, 576, torch.float32), (3, 72, torch.bfloat16), (1, 40, torch.float32)]:
    weight = Int8Weight.quantize(torch.randn(50, in_features) * 0.02)
    x = torch.randn(rows, in_features).to(dtype)
    got = native.int8_rows_op()(x, weight.q, weight.scales.float(), None).double()
    x_bf16, w = x.bfloat16().double(), weight.dequantize(torch.float64)
    exact, magnitude = x_bf16 @ w.T, x_bf16.abs() @ w.abs().T
    bound = torch.finfo(torch.bfloat16).eps * exact.abs() + 2 * in_features * torch.finfo(torch.float32).eps * magnitude
    worst = max(worst, ((got - exact).abs() / bound).max().item())
    for weight_dtype in (torch.float32, torch.bfloat16):
        dense, bias = (torch.randn(50, in_features) * 0.05).to(weight_dtype), torch.randn(50).to(dtype)
        exact, bound = dense_bound(x, dense, bias, dtype)
        worst = max(worst, ((native.dense_rows_op()(x, dense, bias).double() - exact).abs() / bound).max().item())
    for kind in ("q4_1", "q8_0"):
        blocks = BlockWeight.quantize(torch.randn(48, 96) * 0.05, kind)
        x = (torch.randn(rows, 96) * torch.linspace(0.1, 3, 96)).to(dtype)
        exact, bound = block_bound(x, blocks, dtype)
        got = native.block_rows_op(kind)(x, [blocks.blocks])[0].double()
        worst = max(worst, ((got - exact).abs() / bound).max().item())
print(native.vector_bits(), worst)
"""


@pytest.mark.parametrize(
    "flags, bits",
    [("-mno-avx512f", 256), ("-mno-avx512f -mno-avx2 -mno-fma", 0), ("-mno-avx512vnni", 512)],
    ids=["avx2", "scalar", "avx512-without-vnni"],
)
def test_the_row_kernels_narrower_loops_keep_their_contracts(flags, bits, tmp_path):
    """The AVX2 loop (the AMD EPYC dev box has no AVX-512), the scalar one and (the block kernels)
    AVX-512 without VNNI, built here with those instructions turned off: each kernel within its
    contract's bound (ratio to it at most 1)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the vector loops are x86's")
    done = subprocess.run(
        [sys.executable, "-c", NARROWER_BUILD_CHECK, str(tmp_path), os.path.dirname(__file__)],
        env={**os.environ, native.FLAGS_VARIABLE: flags},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    vector_bits, worst = done.stdout.split()
    assert int(vector_bits) == bits and float(worst) <= 1.0
