"""LoRA for a fused group (adapters/lora_group_kernels.py through ops.add_lora_group_rows) against
each member's own reference delta on its columns; in Triton's interpreter on CPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

from adapters import lora_group_kernels
from adapters.lora_kernels import BLOCK_M, LoraRows
from adapters.ops import add_lora_group_rows, add_lora_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# q/k/v-like members off every tile: outputs 72, 40 and 40 (the expand's column blocks straddle no
# member), rank 12 in a 16-wide tile, 100 inputs over two 64-wide steps, 53 rows.
S, R, IN, N = 4, 12, 100, 53
SIZES = [72, 40, 40]
SLOT_WEIGHTS = torch.tensor([0.2, 0.15, 0.5, 0.15, 0.0])  # base (-1), slots 0..2; slot 3 stays empty


def random_group(dtype, terms: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, IN, generator=gen).to(DEVICE, dtype)
    lora_as = [torch.randn(S, R, IN, generator=gen).to(DEVICE, dtype) for _ in SIZES]
    lora_bs = [torch.randn(S, R, out, generator=gen).to(DEVICE, dtype) for out in SIZES]
    for a, b in zip(lora_as, lora_bs):
        a[2, 8:], b[2, 8:] = 0, 0  # slot 2 holds a rank-8 adapter: zero past its rank
    slots = torch.multinomial(SLOT_WEIGHTS, terms * N, replacement=True, generator=gen).view(terms, N) - 1
    slots[-1, :10] = -1  # composed rows next to rows with one term
    assert (slots[0] == 1).sum() > BLOCK_M  # slot 1 needs two programs in term 0
    scales = torch.rand(terms, N, generator=gen) * 2 - 0.5
    return x, lora_as, lora_bs, slots.to(DEVICE), scales.to(DEVICE)


def member_references(y, x, lora_as, lora_bs, slots, scales):
    """Each member's delta by the engine's reference op, on its own columns of y."""
    expected = y.clone()
    for j, (a, b) in enumerate(zip(lora_as, lora_bs)):
        if a is not None:
            columns = slice(sum(SIZES[:j]), sum(SIZES[: j + 1]))
            expected[:, columns] = add_lora_reference(
                y[:, columns].float(), x.float(), a.float(), b.float(), slots, scales
            ).to(y.dtype)
    return expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("terms", [1, 2], ids=["one-term", "composed"])
@pytest.mark.parametrize("absent", [None, 1], ids=["all-members", "k-untargeted"])
def test_one_shrink_and_expand_per_group_equal_each_members_delta(dtype, terms, absent):
    x, lora_as, lora_bs, slots, scales = random_group(dtype, terms)
    if absent is not None:  # a member no loaded adapter targets has no buffers
        lora_as[absent] = lora_bs[absent] = None
    rows = LoraRows.build(slots, scales, S)
    y = torch.randn(N, sum(SIZES), generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    got = add_lora_group_rows(y.clone(), x, lora_as, lora_bs, SIZES, rows)
    expected = member_references(y, x, lora_as, lora_bs, slots, scales)
    # h is rounded to the dtype once, then y once: a few ulps of the largest output (as test_lora_kernels)
    atol = 8 * torch.finfo(dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    base = (slots < 0).all(0)
    assert torch.equal(got[base], y[base])  # base rows untouched
    if absent is not None:
        columns = slice(sum(SIZES[:absent]), sum(SIZES[: absent + 1]))
        assert torch.equal(got[:, columns], y[:, columns])
    assert (got.float() - y.float()).abs().max() > 1  # the adapters did move the rows


def rank_tables(*per_member: list[int]) -> list[torch.Tensor]:
    return [torch.tensor(ranks, dtype=torch.int32, device=DEVICE) for ranks in per_member]


def test_each_member_reads_nothing_past_each_slots_own_rank(monkeypatch):
    """Slot 2 holds a rank-8 adapter in the rank-12 buffers, and slot 0's adapter does not target k
    (rank 0 there): what lies past those ranks (poisoned with NaN here) is never loaded, and every
    tensor the kernels allocate starts as NaN, so the expand reads only entries of h the shrink wrote."""
    x, lora_as, lora_bs, slots, scales = random_group(torch.float32, terms=2)
    lora_as[1][0], lora_bs[1][0] = 0, 0
    rows = LoraRows.build(slots, scales, S)
    y = torch.randn(N, sum(SIZES), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    expected = member_references(y, x, lora_as, lora_bs, slots, scales)
    for a, b in zip(lora_as, lora_bs):
        a[2, 8:], b[2, 8:] = float("nan"), float("nan")
    lora_as[1][0], lora_bs[1][0] = float("nan"), float("nan")
    slot_ranks = [[R, R, 8, 0], [0, R, 8, 0], [R, R, 8, 0]]
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kwargs: empty(*shape, **kwargs).fill_(float("nan")))
    got = add_lora_group_rows(y.clone(), x, lora_as, lora_bs, SIZES, rows, slot_ranks, rank_tables(*slot_ranks))
    monkeypatch.undo()
    atol = 8 * torch.finfo(torch.float32).eps * expected.abs().max().item()
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


class LaunchSpy:
    """Stands in for a kernel: records each launch by name, then runs the kernel."""

    def __init__(self, kernel, name: str, launches: list[str]):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        self.launches.append(self.name)
        return self.kernel[grid]


def test_a_group_none_of_the_steps_slots_targets_launches_nothing(monkeypatch):
    """Decided on the host from the step's slots (no sync), member by member; a graph's rows (any
    slot) launch when some loaded slot targets a member."""
    launches = []
    for name in ("_group_shrink_kernel", "_group_expand_kernel"):
        monkeypatch.setattr(lora_group_kernels, name, LaunchSpy(getattr(lora_group_kernels, name), name, launches))
    x, lora_as, lora_bs, slots, scales = random_group(torch.float32, terms=1)
    slots = torch.where(slots == 2, -1, slots)  # the step's slots: 0 and 1
    y = torch.randn(N, sum(SIZES), device=DEVICE)
    slot_ranks = [[0, 0, 8, 0]] * 3  # this layer: only slot 2's adapter targets it
    tables = rank_tables(*slot_ranks)
    step_rows = LoraRows.build(slots, scales, S, slot_list=(0, 1))
    assert torch.equal(add_lora_group_rows(y.clone(), x, lora_as, lora_bs, SIZES, step_rows, slot_ranks, tables), y)
    assert launches == []
    graph_rows = LoraRows.build(slots, scales, S)
    assert torch.equal(add_lora_group_rows(y.clone(), x, lora_as, lora_bs, SIZES, graph_rows, slot_ranks, tables), y)
    assert launches == ["_group_shrink_kernel", "_group_expand_kernel"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_shrink_sums_the_same_and_resets_its_counts(monkeypatch, dtype):
    """With 132 SMs to fill the shrink splits 100 inputs into 16-wide splits (7 per block, as
    lora_kernels.ShrinkPlan plans); the block's last split sums them, launch after launch (the counts
    reset themselves, as a graph replay needs), with per-member ranks and every buffer NaN-born."""
    monkeypatch.setattr(lora_group_kernels, "target_programs", lambda device: 132)
    launches = []
    monkeypatch.setattr(
        lora_group_kernels, "_group_shrink_kernel", GridSpy(lora_group_kernels._group_shrink_kernel, launches)
    )
    x, lora_as, lora_bs, slots, scales = random_group(dtype, terms=2)
    lora_as[1][0], lora_bs[1][0] = 0, 0
    rows = LoraRows.build(slots, scales, S)
    slot_ranks = [[R, R, 8, 0], [0, R, 8, 0], [R, R, 8, 0]]
    y = torch.randn(N, sum(SIZES), generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    expected = member_references(y, x, lora_as, lora_bs, slots, scales)
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *shape, **kwargs: empty(*shape, **kwargs).fill_(float("nan")))
    for _ in range(2):
        got = add_lora_group_rows(y.clone(), x, lora_as, lora_bs, SIZES, rows, slot_ranks, rank_tables(*slot_ranks))
        atol = 8 * torch.finfo(dtype).eps * expected.abs().max().item()
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)
    assert launches == [(rows.row_blocks * 7, 2)] * 2
    assert not rows.split_counts.any()


class GridSpy:
    """Stands in for a kernel: records each launch's grid, then runs the kernel."""

    def __init__(self, kernel, grids: list):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]
