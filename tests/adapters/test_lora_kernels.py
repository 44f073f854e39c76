"""The Triton LoRA kernels (adapters/lora_kernels.py) against their torch references, and the
references against the engine's own reference op; in Triton's interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import math

import pytest
import torch

from adapters import add_lora_reference, lora_kernels
from adapters.lora_kernels import (
    BLOCK_M,
    KernelLayoutError,
    LoraRows,
    ShrinkPlan,
    lora_expand,
    lora_expand_reference,
    lora_shrink,
    lora_shrink_reference,
    max_blocks,
)
from adapters.ops import add_lora_rows

if lora_kernels.HAVE_TRITON:
    import triton
    import triton.language as tl

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
    adapter_rows = slots >= 0  # the only entries of h the shrink writes and the expand reads
    torch.testing.assert_close(h[adapter_rows], h_ref[adapter_rows], atol=ulps(dtype, h_ref.abs().max().item()), rtol=0)
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
    adapter_rows = slots >= 0
    got = lora_shrink(x, transposed, rows, a_transposed=True)[adapter_rows]
    assert torch.equal(got, lora_shrink(x, lora_a, rows)[adapter_rows])


def test_the_references_are_add_lora_reference():
    """Shrink then expand is the engine's semantics for B·A terms (adapters.ops.add_lora_reference)."""
    x, lora_a, lora_b, slots, scales = random_step(torch.float32, seed=1)
    rows = LoraRows.build(slots, scales, S)
    y = torch.randn(N, OUT, device=DEVICE)
    ours = lora_expand_reference(y.clone(), lora_shrink_reference(x, lora_a, rows), lora_b, rows)
    expected = add_lora_reference(y, x, lora_a, lora_b, slots, scales)
    torch.testing.assert_close(ours, expected, atol=ulps(torch.float32, expected.abs().max().item(), 16), rtol=0)
    assert (ours - y).abs().max() > 1  # the adapters did move the rows


class GridSpy:
    """Stands in for a kernel: records each launch's grid, then runs the kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]

    @property
    def programs(self) -> list[int]:
        return [math.prod(grid) for grid in self.grids]


def ranks_of(lora_a: torch.Tensor, *ranks: int) -> torch.Tensor:
    return torch.tensor(ranks, dtype=torch.int32, device=lora_a.device)


def test_the_block_table_covers_each_adapter_row_once_within_the_bound():
    gen = torch.Generator().manual_seed(3)
    for num_rows, num_slots in [(1, 64), (53, 4), (40, 40), (256, 64)]:
        slots = torch.randint(-1, num_slots, (2, num_rows), generator=gen)
        rows = LoraRows.build(slots.to(DEVICE), None, num_slots)
        assert rows.num_blocks == max_blocks(num_rows, num_slots) <= math.ceil(num_rows / BLOCK_M) + num_slots
        for term in range(2):
            seen = []
            for slot, first in zip(rows.block_slots[term].tolist(), rows.block_firsts[term].tolist()):
                if slot >= 0:
                    stop = min(first + BLOCK_M, rows.slot_starts[term, slot + 1].item())
                    block = rows.sorted_rows[term, first:stop].tolist()
                    assert all(slots[term, row] == slot for row in block)
                    seen += block
            assert sorted(seen) == (slots[term] >= 0).nonzero()[:, 0].tolist()


def test_the_grid_grows_with_rows_not_slots(monkeypatch):
    """On a 64-slot buffer the grid is the rows' blocks (× column blocks), whatever the slots: one
    program at one row (the old grid launched 64 per column block, 63 exiting at once), and 40 rows
    on 40 adapters take 3 programs that loop over the 40 one-row blocks."""
    shrink, expand = GridSpy(lora_kernels._shrink_kernel), GridSpy(lora_kernels._expand_kernel)
    monkeypatch.setattr(lora_kernels, "_shrink_kernel", shrink)
    monkeypatch.setattr(lora_kernels, "_expand_kernel", expand)
    monkeypatch.setattr(lora_kernels, "target_programs", lambda device: 1)  # no split, 64-wide columns
    gen = torch.Generator().manual_seed(4)
    slots, rank, out = 64, 16, 128
    lora_a, lora_b = torch.randn(slots, rank, 64, generator=gen).to(DEVICE), torch.randn(slots, rank, out).to(DEVICE)
    for token_slots in ([37], list(range(3, 43))):
        x = torch.randn(len(token_slots), 64, generator=gen).to(DEVICE)
        rows = LoraRows.build(torch.tensor([token_slots], device=DEVICE), None, slots)
        y = torch.zeros(len(token_slots), out, device=DEVICE)
        lora_expand(y, lora_shrink(x, lora_a, rows), lora_b, rows)
        expected = torch.stack([x[t] @ lora_a[s].T @ lora_b[s] for t, s in enumerate(token_slots)])
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    assert shrink.programs == [1, 3] and expand.programs == [out // 64, 3 * out // 64]


def test_split_k_plans_enough_programs_to_fill_132_sms_at_one_row():
    for in_features in (4096, 14336):  # an 8B model's hidden and intermediate sizes
        plan = ShrinkPlan.choose(in_features, num_blocks=1, num_terms=1, target=132)
        assert plan.num_splits >= 132 and plan.k_per_split % plan.block_k == 0
        assert (plan.num_splits - 1) * plan.k_per_split < in_features  # no split without inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_reaches_the_target_at_one_row_and_sums_the_same(monkeypatch, dtype):
    """At one row the shrink splits K until the grid reaches the target (32 here, the interpreter
    being slow), and the last split of each block sums the partials: the same h as the unsplit
    kernel, launch after launch (the counts reset themselves, as a graph replay needs)."""
    spy = GridSpy(lora_kernels._shrink_kernel)
    monkeypatch.setattr(lora_kernels, "_shrink_kernel", spy)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 1024, generator=gen).to(DEVICE, dtype)
    lora_a = torch.randn(3, 16, 1024, generator=gen).to(DEVICE, dtype)
    rows = LoraRows.build(torch.tensor([[1]], device=DEVICE), torch.tensor([[0.5]], device=DEVICE), 3)
    monkeypatch.setattr(lora_kernels, "target_programs", lambda device: 1)
    unsplit = lora_shrink(x, lora_a, rows)
    monkeypatch.setattr(lora_kernels, "target_programs", lambda device: 32)
    first, second = lora_shrink(x, lora_a, rows)[0, 0], lora_shrink(x, lora_a, rows)[0, 0]
    assert spy.programs[0] == 1 and spy.programs[1] >= 32
    assert torch.equal(first, second) and not bool(rows.split_counts.any())
    reference = lora_shrink_reference(x, lora_a, rows)[0, 0]
    torch.testing.assert_close(first, reference, atol=ulps(dtype, reference.abs().max().item(), 8), rtol=0)
    torch.testing.assert_close(first, unsplit[0, 0], atol=ulps(dtype, reference.abs().max().item(), 8), rtol=0)


def test_split_k_over_a_mixed_composed_step(monkeypatch):
    monkeypatch.setattr(lora_kernels, "target_programs", lambda device: lora_kernels.TARGET_PROGRAMS)
    x, lora_a, _, slots, scales = random_step(torch.float32)
    rows = LoraRows.build(slots, scales, S)
    adapter_rows = slots >= 0
    h, h_ref = lora_shrink(x, lora_a, rows)[adapter_rows], lora_shrink_reference(x, lora_a, rows)[adapter_rows]
    torch.testing.assert_close(h, h_ref, atol=ulps(torch.float32, h_ref.abs().max().item()), rtol=0)


def test_a_slot_of_lower_rank_reads_nothing_past_its_own_rank():
    """Slot 2 holds a rank-8 adapter in a rank-12 buffer: with the rank table the kernels never load
    its rows 8..11 (poisoned here with NaN: a single load of them would reach y)."""
    x, lora_a, lora_b, slots, scales = random_step(torch.float32)
    rows = LoraRows.build(slots, scales, S)
    y = torch.randn(N, OUT, device=DEVICE)
    expected = lora_expand_reference(y.clone(), lora_shrink_reference(x, lora_a, rows), lora_b, rows)
    lora_a[2, 8:], lora_b[2, 8:] = float("nan"), float("nan")
    ranks = ranks_of(lora_a, R, R, 8, 0)
    got = lora_expand(y.clone(), lora_shrink(x, lora_a, rows, ranks=ranks), lora_b, rows, ranks=ranks)
    torch.testing.assert_close(got, expected, atol=ulps(torch.float32, expected.abs().max().item()), rtol=0)


def test_h_is_not_zero_filled_and_expand_reads_only_what_shrink_wrote(monkeypatch):
    """Every tensor the kernels allocate starts as NaN, and zero-filling one is refused: y still
    equals the reference, so expand never reads an entry of h that shrink did not write (base rows,
    ranks past a slot's own)."""
    x, lora_a, lora_b, slots, scales = random_step(torch.float32)
    rows, ranks = LoraRows.build(slots, scales, S), ranks_of(lora_a, R, R, 8, 0)
    y = torch.randn(N, OUT, device=DEVICE)
    expected = lora_expand_reference(y.clone(), lora_shrink_reference(x, lora_a, rows), lora_b, rows)
    empty = torch.empty

    def poisoned(*shape, **kwargs):
        return empty(*shape, **kwargs).fill_(float("nan"))

    def refused(*shape, **kwargs):
        raise AssertionError("a LoRA kernel buffer was zero-filled")

    monkeypatch.setattr(torch, "empty", poisoned)
    monkeypatch.setattr(torch, "zeros", refused)
    h = lora_shrink(x, lora_a, rows, ranks=ranks)
    got = lora_expand(y.clone(), h, lora_b, rows, ranks=ranks)
    monkeypatch.undo()
    assert bool(h[:, (slots < 0).all(0)].isnan().all())  # base rows: never written
    torch.testing.assert_close(got, expected, atol=ulps(torch.float32, expected.abs().max().item()), rtol=0)


if lora_kernels.HAVE_TRITON:

    @triton.jit
    def _offset_kernel(slots, out, stride):
        tl.store(out, lora_kernels._slot_offset(tl.load(slots), stride))


def test_slot_offsets_are_64_bit():
    """An lm_head B at rank 64 on a 128K vocabulary is 2^23 elements a slot: slot 300 starts past
    2^31, where an int32 slot·stride wraps negative. The kernels compute it as the kernel below does."""
    stride = 64 * 131072
    slots = torch.tensor([300], dtype=torch.int32, device=DEVICE)
    out = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    _offset_kernel[(1,)](slots, out, stride)
    assert out.item() == 300 * stride > 2**31


def test_tensors_the_kernels_cannot_index_are_refused_or_copied():
    x, lora_a, lora_b, slots, scales = random_step(torch.float32)
    rows = LoraRows.build(slots, scales, S)
    h = lora_shrink(x, lora_a, rows)
    y_columns = torch.randn(OUT, N, device=DEVICE).T  # [N, OUT] with stride (1, N): written in place
    with pytest.raises(KernelLayoutError, match="y with unit stride"):
        lora_expand(y_columns, h, lora_b, rows)
    with pytest.raises(KernelLayoutError, match="lora_b"):
        lora_expand(torch.zeros(N, OUT, device=DEVICE), h, lora_b.transpose(1, 2).contiguous().transpose(1, 2), rows)
    x_columns = x.T.contiguous().T  # an input: copied, same answer
    adapter_rows = slots >= 0
    assert torch.equal(lora_shrink(x_columns, lora_a, rows)[adapter_rows], h[adapter_rows])


def test_a_layer_none_of_the_steps_slots_targets_launches_nothing(monkeypatch):
    """Decided on the host from the step's slots (no sync); a graph's rows (any slot) launch when
    some loaded slot targets the layer."""
    spy = GridSpy(lora_kernels._shrink_kernel)
    monkeypatch.setattr(lora_kernels, "_shrink_kernel", spy)
    x, lora_a, lora_b, slots, scales = random_step(torch.float32, terms=1)
    slots = torch.where(slots == 2, -1, slots)  # the step's slots: 0 and 1
    y = torch.randn(N, OUT, device=DEVICE)
    slot_ranks = [0, 0, 8, 0]  # this layer: only slot 2's adapter targets it
    ranks = ranks_of(lora_a, *slot_ranks)
    step_rows = LoraRows.build(slots, scales, S, slot_list=(0, 1))
    assert torch.equal(add_lora_rows(y.clone(), x, lora_a, lora_b, step_rows, None, slot_ranks, ranks), y)
    assert spy.grids == []
    graph_rows = LoraRows.build(slots, scales, S)
    assert torch.equal(add_lora_rows(y.clone(), x, lora_a, lora_b, graph_rows, None, slot_ranks, ranks), y)
    assert len(spy.grids) == 1
