"""The Triton LoRA kernels (adapters/lora_kernels.py) against their torch references, and the
references against the engine's own reference op; in Triton's interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from adapters import add_lora_reference
from adapters.lora_kernels import (
    BLOCK_M,
    LoraRows,
    lora_expand,
    lora_expand_reference,
    lora_shrink,
    lora_shrink_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Sizes off every tile: rank 12 in a 16-wide tile, 100 inputs over two 64-wide steps, 72 outputs in two
# column blocks, 53 rows; slot 1 takes about half the rows, so its runs span several BLOCK_M blocks.
S, R, IN, OUT, N = 4, 12, 100, 72, 53
SLOT_WEIGHTS = torch.tensor([0.2, 0.15, 0.5, 0.15, 0.0])  # base (-1), slots 0..2; slot 3 stays empty


def ulps(dtype: torch.dtype, magnitude: float, count: int = 4) -> float:
    """`count` units in the last place of `magnitude` in `dtype`: the kernels sum in another order
    than the references, and a half-precision rounding of h moves y by about an ulp of y."""
    return count * torch.finfo(dtype).eps * magnitude


def random_step(dtype, terms: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, IN, generator=gen).to(DEVICE, dtype)
    lora_a = torch.randn(S, R, IN, generator=gen).to(DEVICE, dtype)
    lora_b = torch.randn(S, R, OUT, generator=gen).to(DEVICE, dtype)
    lora_a[2, 8:], lora_b[2, 8:] = 0, 0  # slot 2 holds a rank-8 adapter: zero past its rank
    slots = torch.multinomial(SLOT_WEIGHTS, terms * N, replacement=True, generator=gen).view(terms, N) - 1
    slots[-1, :10] = -1  # composed rows next to rows with one term
    assert (slots[0] == 1).sum() > BLOCK_M  # slot 1 needs two programs in term 0
    scales = torch.rand(terms, N, generator=gen) * 2 - 0.5
    return x, lora_a, lora_b, slots.to(DEVICE), scales.to(DEVICE)


def test_rows_sort_each_term_by_slot_and_refill_in_place():
    slots = torch.tensor([[2, -1, 0, 2, 0, -1], [-1, 1, -1, -1, 1, 0]], device=DEVICE)
    rows = LoraRows.build(slots, None, num_slots=3)
    assert rows.sorted_rows.tolist() == [[1, 5, 2, 4, 0, 3], [0, 2, 3, 5, 1, 4]]
    assert rows.slot_starts.tolist() == [[2, 4, 4, 6], [3, 4, 6, 6]]  # base rows sort first, slot 2 of term 1 is empty
    pointers = [t.data_ptr() for t in (rows.token_slots, rows.sorted_rows, rows.slot_starts, rows.token_scales)]
    rows.fill_(slots.flip(1), torch.full(slots.shape, 0.5, device=DEVICE))
    assert [t.data_ptr() for t in (rows.token_slots, rows.sorted_rows, rows.slot_starts, rows.token_scales)] == pointers
    assert rows.sorted_rows[0].tolist() == [0, 4, 1, 3, 2, 5] and bool((rows.token_scales == 0.5).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_shrink_and_expand_equal_their_references(dtype, bias):
    x, lora_a, lora_b, slots, scales = random_step(dtype)
    rows = LoraRows.build(slots, scales, S)
    h, h_ref = lora_shrink(x, lora_a, rows), lora_shrink_reference(x, lora_a, rows)
    torch.testing.assert_close(h, h_ref, atol=ulps(dtype, h_ref.abs().max().item()), rtol=0)
    lora_bias = torch.randn(S, OUT, device=DEVICE).to(dtype) if bias else None
    y = torch.randn(N, OUT, device=DEVICE).to(dtype)
    got = lora_expand(y.clone(), h_ref, lora_b, rows, lora_bias)
    expected = lora_expand_reference(y.clone(), h_ref, lora_b, rows, lora_bias)
    torch.testing.assert_close(got, expected, atol=ulps(dtype, expected.abs().max().item()), rtol=0)
    assert torch.equal(got[(slots < 0).all(0)], y[(slots < 0).all(0)])  # base rows untouched


def test_transposed_a_reads_the_same_weights():
    x, lora_a, _, slots, scales = random_step(torch.float32)
    rows = LoraRows.build(slots, scales, S)
    transposed = lora_a.transpose(1, 2).contiguous()  # [S, in, R], as an embedding's A is kept
    assert torch.equal(lora_shrink(x, transposed, rows, a_transposed=True), lora_shrink(x, lora_a, rows))


def test_the_references_are_add_lora_reference():
    """Shrink then expand is the engine's semantics for B·A terms (adapters.ops.add_lora_reference)."""
    x, lora_a, lora_b, slots, scales = random_step(torch.float32, seed=1)
    rows = LoraRows.build(slots, scales, S)
    y = torch.randn(N, OUT, device=DEVICE)
    ours = lora_expand_reference(y.clone(), lora_shrink_reference(x, lora_a, rows), lora_b, rows)
    expected = add_lora_reference(y, x, lora_a, lora_b, slots, scales)
    torch.testing.assert_close(ours, expected, atol=ulps(torch.float32, expected.abs().max().item(), 16), rtol=0)
    assert (ours - y).abs().max() > 1  # the adapters did move the rows
