"""Weights in Q4_1 and Q8_0 blocks (adapters/blocks.py) and our kernels over them
(adapters/block_kernels.cpp): the packing, its exactness on the default model's GGUF file, and the
kernels' contract (activations quantized to int16 per group of 32, exact integer sums, float32 scaling).
The narrower loops other CPUs build are checked in test_native.py's builds."""

from __future__ import annotations

import pytest
import torch

from adapters import native
from adapters.blocks import GROUP, Q4_1, Q8_0, BlockWeight, can_pack, kind_of

FP32_EPS = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    assert native.load_row_kernels(tmp_path_factory.mktemp("native-cache")), "our kernels did not build"


def block_bound(x: torch.Tensor, weight: BlockWeight, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact x·Wᵀ in float64 for the dequantized W, the most the kernel may differ from it): each
    activation off by at most half its group's int16 step (amax / 32767) times what multiplies it
    (d·q: w minus the group's minimum for Q4_1, w for Q8_0), float32 sums and scalings, and one
    rounding to `out_dtype`."""
    w = weight.dequantize(torch.float64)  # [N, K]
    x64 = x.double().reshape(-1, x.shape[-1])
    groups = w.unflatten(-1, (-1, GROUP))  # [N, G, 32]
    scaled = groups - groups.amin(-1, keepdim=True) if weight.kind == Q4_1 else groups.abs()
    steps = x64.unflatten(-1, (-1, GROUP)).abs().amax(-1) / 32767  # [M, G]
    activations = steps / 2 @ scaled.sum(-1).T  # [M, N]
    exact = x64 @ w.T
    sums = x.shape[-1] * FP32_EPS * (x64.abs() @ w.abs().T)
    bound = activations + sums + torch.finfo(out_dtype).eps / 2 * exact.abs() + 1e-30
    return exact.reshape(*x.shape[:-1], -1), bound.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
def test_packing_is_exact_on_its_own_grid_and_within_half_a_step_of_any_weight(kind):
    weight = torch.randn(48, 96) * 0.05
    packed = BlockWeight.quantize(weight, kind)
    assert packed.shape == (48, 96) and packed.blocks.dtype == torch.uint8 and kind_of(packed.blocks) == kind
    assert packed.nbytes == 48 * 96 * (5 if kind == Q4_1 else 8.5) / 8  # llama.cpp's bits a weight
    values = packed.dequantize(torch.float32)
    assert torch.equal(BlockWeight.quantize(values, kind).blocks, packed.blocks)  # its own values: no loss
    groups = weight.unflatten(-1, (-1, GROUP))
    steps = (groups.amax(-1) - groups.amin(-1)) / 15 if kind == Q4_1 else groups.abs().amax(-1) / 127
    error = (values - weight).unflatten(-1, (-1, GROUP)).abs().amax(-1)
    assert (error <= steps * 0.5 * 1.002 + 1e-7).all()  # half a step, the float16 scale's rounding on top
    assert (error > 0).any()


def test_a_constant_group_packs_and_a_shape_that_does_not_block_is_refused():
    weight = torch.zeros(16, 64)
    weight[:, 32:] = 0.25  # Q4_1: a scale of 0 and the value as the minimum; Q8_0: zeros only
    assert torch.equal(BlockWeight.quantize(weight, Q4_1).dequantize(torch.float32), weight)
    assert torch.equal(BlockWeight.quantize(weight[:, :32], Q8_0).dequantize(torch.float32), weight[:, :32])
    assert can_pack(16, 32) and not can_pack(8, 32) and not can_pack(16, 40)
    with pytest.raises(ValueError, match="multiple of 16 and its inputs of 32"):
        BlockWeight.quantize(torch.zeros(8, 64), Q4_1)
    with pytest.raises(ValueError, match="unknown block kind 'q5_0'"):
        BlockWeight.quantize(weight, "q5_0")


@pytest.mark.real_model
def test_the_default_models_gguf_weights_pack_back_to_their_own_values():
    """Every Q4_1 and Q8_0 tensor of the default model's file, as gguf dequantizes it (as
    transformers loads it): packing gives back exactly those values, so a q4_1 base of the
    default model computes with the full-precision model's weights."""
    import gguf

    from server.engine.model_loader import default_gguf_path

    reader = gguf.GGUFReader(default_gguf_path())
    counts = {Q4_1: 0, Q8_0: 0}
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name.lower()
        if kind not in counts:
            continue
        weight = torch.from_numpy(gguf.dequantize(tensor.data, tensor.tensor_type).copy())
        assert torch.equal(BlockWeight.quantize(weight, kind).dequantize(torch.float32), weight), tensor.name
        counts[kind] += 1
    assert counts == {Q4_1: 210, Q8_0: 1}


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3])
def test_the_block_kernels_keep_their_contract(built, kind, dtype, rows):
    """Leading dimensions kept, the result in the activations' dtype, within block_bound."""
    weight = BlockWeight.quantize(torch.randn(80, 192) * 0.05, kind)
    x = (torch.randn(2, rows, 192) * torch.linspace(0.1, 3, 192)).to(dtype)  # groups of unlike ranges
    (got,) = native.block_rows_op(kind)(x, [weight.blocks])
    assert got.dtype == dtype and got.shape == (2, rows, 80)
    exact, bound = block_bound(x, weight, dtype)
    assert ((got.double() - exact).abs() <= bound).all()


def test_weights_on_one_input_in_one_call_each_get_what_they_get_alone(built):
    weights = [BlockWeight.quantize(torch.randn(n, 576) * 0.02, Q4_1).blocks for n in (576, 192, 192)]
    x = torch.randn(1, 1, 576)
    op = native.block_rows_op(Q4_1)
    for y, blocks in zip(op(x, weights), weights, strict=True):
        assert torch.equal(y, op(x, [blocks])[0])


def test_the_block_kernels_refuse_what_they_cannot_read(built):
    q4 = BlockWeight.quantize(torch.randn(16, 64), Q4_1).blocks
    q8 = BlockWeight.quantize(torch.randn(16, 64), Q8_0).blocks
    with pytest.raises(RuntimeError, match="x's last dimension 32 is not the weights' 64"):
        native.block_rows_op(Q4_1)(torch.randn(1, 32), [q4])
    with pytest.raises(RuntimeError, match=r"blocks: contiguous uint8 \[N / 16, 2, 320\] for inputs of 64"):
        native.block_rows_op(Q4_1)(torch.randn(1, 64), [q8])
    other = BlockWeight.quantize(torch.randn(16, 96), Q4_1).blocks
    with pytest.raises(RuntimeError, match=r"\[N / 16, 2, 320\] for inputs of 64, got \[1, 3, 320\]"):
        native.block_rows_op(Q4_1)(torch.randn(1, 64), [q4, other])


@pytest.mark.parametrize("kind", [Q4_1, Q8_0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_our_dequantizing_kernel_gives_the_blocks_values(built, kind, dtype):
    """The dequantized matmul's one pass (block_kernels.cpp) against the torch ops' reading of the layout."""
    weight = BlockWeight.quantize(torch.randn(48, 96) * 0.05, kind)
    out = torch.full((48, 96), float("nan"), dtype=dtype)
    assert weight.dequantize(dtype, out=out) is out
    assert torch.equal(out, weight._dequantized().to(dtype))
    with pytest.raises(RuntimeError, match=r"out: contiguous \[48, 96\]"):
        native.dequantize_blocks_op()(weight.blocks, torch.empty(96, 48, dtype=dtype))
