"""The layer kernels of the CUDA pass (server/engine/layer_kernels.py) against their torch
references, the stock ops in their order; in Triton's interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from server.engine.layer_kernels import (
    add_rms_norm,
    add_rms_norm_reference,
    rope_kv_write,
    rope_kv_write_reference,
    silu_mul,
    silu_mul_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def ulps(dtype: torch.dtype, magnitude: torch.Tensor, count: float = 1) -> torch.Tensor:
    """`count` units in the last place of each element: a sum in another order, or a libm's exp
    against torch's, may move a rounding by one."""
    return count * torch.finfo(dtype).eps * magnitude.abs().float()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_residual", [False, True], ids=["first-layer", "residual"])
def test_add_rms_norm_equals_the_stock_norm(dtype, has_residual):
    x, residual = randn(7, 100, dtype=dtype), randn(7, 100, dtype=dtype, seed=1) if has_residual else None
    weight = randn(100, dtype=dtype, seed=2)
    normed, summed = add_rms_norm(x, residual, weight, 1e-5)
    expected_normed, expected_summed = add_rms_norm_reference(x, residual, weight, 1e-5)
    assert torch.equal(summed, expected_summed)  # one rounding of one sum: exact
    assert ((normed.float() - expected_normed.float()).abs() <= ulps(dtype, expected_normed, 4)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (6, 2, 24)])
def test_rope_kv_write_equals_the_stock_rotary_and_pool_write(dtype, heads, kv_heads, head_dim):
    rows, positions_in_table, pool = 5, 40, 32
    qkv = randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    angles = torch.arange(positions_in_table)[:, None] * torch.rand(head_dim // 2)[None]
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)
    positions = torch.tensor([0, 3, 17, 39, 5], device=DEVICE)
    write = torch.tensor([1, 4, 30, 8, 9], device=DEVICE)
    pools = [torch.zeros(kv_heads, pool, head_dim, dtype=dtype, device=DEVICE) for _ in range(4)]
    q = rope_kv_write(qkv, cos, sin, positions, write, pools[0], pools[1], heads)
    expected_q = rope_kv_write_reference(qkv, cos, sin, positions, write, pools[2], pools[3], heads)
    # The same two roundings of the same products, then one of their sum: bit for bit.
    assert torch.equal(q, expected_q) and torch.equal(pools[0], pools[2]) and torch.equal(pools[1], pools[3])
    untouched = torch.ones(pool, dtype=torch.bool)
    untouched[write.cpu()] = False
    assert not pools[0][:, untouched].any()  # only the rows' write positions are written


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_equals_the_stock_mlp_gate(dtype):
    gate_up = randn(6, 2 * 1500, dtype=dtype) * 4  # two column blocks, the second partial
    got, expected = silu_mul(gate_up), silu_mul_reference(gate_up)
    assert ((got.float() - expected.float()).abs() <= ulps(dtype, expected, 4) + 1e-30).all()


def test_a_half_rounding_left_out_is_caught():
    """The tests above can fail: a norm that skips the stock rounding of h before the weight differs."""
    x, weight = randn(7, 100, dtype=torch.bfloat16), randn(100, dtype=torch.bfloat16, seed=2) * 3
    h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    unrounded = (weight.float() * h).to(torch.bfloat16)
    assert not torch.equal(unrounded, add_rms_norm(x, None, weight, 1e-5)[0])
