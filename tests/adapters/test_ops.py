"""add_lora (direct runs + grouped bmm over slot buffers) against add_lora_reference (a per-token loop)."""

from __future__ import annotations

import copy

import pytest
import torch

import adapters.layer
from adapters import AdapterRegistry, LoraBatch, add_lora, add_lora_reference, wrap_model
from adapters.batch import MAX_DIRECT_RUNS, MIN_RUN_ROWS, Run

NUM_SLOTS, MAX_RANK, D_IN, D_OUT = 4, 8, 24, 40
SLOT_RANKS = [3, 8, 1, 5]  # mixed ranks; buffers are zero past each slot's rank, as LoraLinear keeps them
# (max_direct_runs, min_run_rows): the server's split, and settings that force one path or the other
DEFAULT, ALL_GROUPED, ALL_RUNS = (MAX_DIRECT_RUNS, MIN_RUN_ROWS), (0, 10**9), (10**9, 1)
PATHS = dict(argvalues=[DEFAULT, ALL_GROUPED, ALL_RUNS], ids=["default", "all-grouped", "all-runs"])


def slot_buffers(ranks=SLOT_RANKS):
    lora_a = torch.zeros(NUM_SLOTS, MAX_RANK, D_IN)  # [S, R, in]
    lora_b = torch.zeros(NUM_SLOTS, MAX_RANK, D_OUT)  # [S, R, out]
    for slot, rank in enumerate(ranks):
        lora_a[slot, :rank] = torch.randn(rank, D_IN)
        lora_b[slot, :rank] = torch.randn(rank, D_OUT)
    return lora_a, lora_b


def shuffled(values):
    values = torch.tensor(values)
    return values[torch.randperm(values.numel())]


CASES = {
    "every-slot-and-base": lambda: torch.randint(-1, NUM_SLOTS, (37,)),
    "unequal-groups": lambda: shuffled([0] * 9 + [2] * 2 + [-1] * 3 + [1] * 5),
    "non-prefix-1-and-3": lambda: shuffled([1] * 4 + [3] * 7 + [-1] * 5),
    "single-non-prefix-slot": lambda: torch.full((10,), 2),
    "prefix-equal-groups": lambda: shuffled([0] * 6 + [1] * 6),
    "one-adapter-token": lambda: torch.tensor([-1, -1, 3, -1]),
    "long-runs-and-scattered": lambda: torch.tensor([0] * 20 + [1, 2, 1, 3] + [-1] * 3 + [2] * 17 + [0, 0] + [3] * 16),
    "runs-only": lambda: torch.tensor([-1] * 5 + [1] * 18 + [3] * 30),
    "many-short-runs": lambda: torch.tensor([0, 1, 2, 3] * 3 + [2] * 16 + [1, 0]),
}


def check_against_reference(token_slots, num_rows=1, path=DEFAULT, ranks=SLOT_RANKS):
    lora_a, lora_b = slot_buffers(ranks)
    x = torch.randn(num_rows, token_slots.numel() // num_rows, D_IN)  # [B, T, in]
    y = torch.randn(num_rows, token_slots.numel() // num_rows, D_OUT)  # [B, T, out]
    batch = LoraBatch.build(token_slots, max_direct_runs=path[0], min_run_rows=path[1])
    expected = add_lora_reference(y, x, lora_a, lora_b, token_slots)
    actual = add_lora(y.clone(), x, lora_a, lora_b, ranks, batch)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)

    flat_actual, flat_y = actual.view(-1, D_OUT), y.view(-1, D_OUT)
    untouched = (token_slots < 0) | (torch.tensor(ranks)[token_slots.clamp(min=0)] == 0)
    assert torch.equal(flat_actual[untouched], flat_y[untouched]), "base rows must be left exactly as they were"
    if bool((~untouched).any()):
        assert (flat_actual[~untouched] - flat_y[~untouched]).abs().min() > 0, "every adapter row gets a delta"
    return batch


def runs_of(token_slots, path):
    """The direct runs a step should get, by a plain loop: every maximal stretch of one adapter
    slot, or when there are more than max_direct_runs of them, those with min_run_rows rows."""
    max_direct_runs, min_run_rows = path
    runs, start = [], 0
    values = token_slots.tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            if values[start] >= 0:
                runs.append(Run(values[start], start, i))
            start = i
    return runs if len(runs) <= max_direct_runs else [r for r in runs if r.stop - r.start >= min_run_rows]


@pytest.mark.parametrize("path", **PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_add_lora_matches_reference(case, path):
    token_slots = CASES[case]()
    batch = check_against_reference(token_slots, path=path)
    assert batch.runs == runs_of(token_slots, path)
    in_runs = torch.zeros(token_slots.numel(), dtype=torch.bool)
    for run in batch.runs:
        in_runs[run.start : run.stop] = True
    grouped = token_slots[(token_slots >= 0) & ~in_runs]
    used, counts = torch.unique(grouped, return_counts=True)
    if batch.groups is None:
        assert grouped.numel() == 0
    else:
        groups = batch.groups
        assert groups.slot_list == groups.slots.tolist() == used.tolist()
        assert groups.slots_are_prefix == (used.tolist() == list(range(used.numel())))
        assert (groups.num_groups, groups.group_len) == (used.numel(), int(counts.max()))
        assert (groups.pad_mask is None) == bool((counts == counts.max()).all())
        assert sorted(token_slots[groups.rows].tolist()) == sorted(
            [s for s, n in zip(used.tolist(), counts.tolist()) for _ in range(int(counts.max()))]
        )
    assert batch.num_tokens == token_slots.numel()


@pytest.mark.parametrize("path", **PATHS)
def test_layer_ranks_below_buffer_width_and_untargeted_slots(path):
    """A layer passes its own ranks: slot 1 does not target it (rank 0, zero buffers), so its rows
    stay exactly as they were; the others use only their first `rank` rows of A and B."""
    token_slots = torch.tensor([1] * 20 + [0, 1, 2, 3, 1] + [3] * 18 + [-1, 1])
    check_against_reference(token_slots, path=path, ranks=[2, 0, 1, 4])
    check_against_reference(token_slots, path=path, ranks=[0, 0, 0, 0])


@pytest.mark.parametrize("seed", range(12))
def test_add_lora_matches_reference_on_random_batches(seed):
    """Random [B, T] batches, flattened row-major as the server builds them; runs of random length."""
    generator = torch.Generator().manual_seed(seed)
    num_rows, num_cols = (int(n) for n in torch.randint(1, 7, (2,), generator=generator))
    token_slots = torch.randint(-1, NUM_SLOTS, (num_rows * num_cols,), generator=generator)
    if bool((token_slots < 0).all()):
        token_slots[0] = 1
    path = tuple(int(n) for n in torch.randint(0, 5, (2,), generator=generator))
    check_against_reference(token_slots, num_rows=num_rows, path=path)


def test_add_lora_writes_into_y():
    lora_a, lora_b = slot_buffers()
    x, y = torch.randn(5, D_IN), torch.randn(5, D_OUT)
    token_slots = torch.tensor([0, -1, 3, 3, 1])  # a run of 3s and grouped rows
    expected = add_lora_reference(y, x, lora_a, lora_b, token_slots)
    out = add_lora(y, x, lora_a, lora_b, SLOT_RANKS, LoraBatch.build(token_slots, max_direct_runs=1, min_run_rows=2))
    assert out.data_ptr() == y.data_ptr()
    torch.testing.assert_close(y, expected)


def test_all_base_batch_is_none():
    assert LoraBatch.build(torch.full((9,), -1)) is None
    assert LoraBatch.build(torch.tensor([], dtype=torch.long)) is None


def test_all_base_does_no_lora_work(tiny_llama, token_ids, tmp_path, make_peft_adapter, monkeypatch):
    """With no adapter row in the step, no layer calls the LoRA op and logits are exactly the base's."""
    calls = []

    def counting_add_lora(*args):
        calls.append(1)
        return add_lora(*args)

    monkeypatch.setattr(adapters.layer, "add_lora", counting_add_lora)
    lora_model = wrap_model(copy.deepcopy(tiny_llama), max_loras=2, max_rank=8)
    registry = AdapterRegistry(lora_model)
    registry.add("a", make_peft_adapter(tiny_llama, tmp_path / "a", r=4, target_modules="all-linear"))
    slot = registry.acquire("a").slot
    num_tokens = token_ids.numel()

    batch = lora_model.build_batch(torch.full((num_tokens,), -1))
    assert batch is None
    with torch.no_grad(), lora_model.gather(batch):
        out = lora_model.model(token_ids).logits
    with torch.no_grad():
        expected = tiny_llama(token_ids).logits
    assert calls == [] and torch.equal(out, expected)

    with torch.no_grad(), lora_model.gather(lora_model.build_batch(torch.full((num_tokens,), slot))):
        lora_model.model(token_ids)
    targeted = [layer for layer in lora_model.layers.values() if layer.lora_a is not None]
    assert len(calls) == len(targeted) == 14  # the spy sees real work: one call per targeted LoRA layer


def _layer_with_slots(bias_slot: int | None = None):
    """A LoraLinear with SLOT_RANKS' adapters loaded (slot `bias_slot` with a LoRA bias)."""
    from torch import nn  # noqa: PLC0415

    from adapters.layer import LoraLinear  # noqa: PLC0415
    from adapters.peft_format import LoraWeights  # noqa: PLC0415
    from adapters.slots import LoraState  # noqa: PLC0415

    layer = LoraLinear(nn.Linear(D_IN, D_OUT), LoraState(), NUM_SLOTS, MAX_RANK)
    lora_a, lora_b = slot_buffers()
    for slot, rank in enumerate(SLOT_RANKS):
        bias = torch.randn(D_OUT) if slot == bias_slot else None
        layer.set_slot(slot, LoraWeights(lora_a[slot, :rank], lora_b[slot, :rank], bias))
    return layer


DECODE_ROWS = torch.tensor([0] * 3 + [2] * 2 + [-1] + [3] * 4)  # a decode step's rows, packed by adapter


@pytest.mark.parametrize("composed", [False, True])
def test_decode_runs_stacked_equal_the_reference_and_follow_slot_loads(composed):
    """A step of few rows whose runs all target the layer: one stacked shrink and expand
    (ops.add_lora_stacked) gives each row its own adapters' deltas at their scales, and loading
    another adapter into a slot replaces the stacked copies of its factors."""
    from adapters.peft_format import LoraWeights  # noqa: PLC0415

    layer = _layer_with_slots()
    slots, scales = DECODE_ROWS, None
    if composed:  # a second term on some rows: slot 1 at 0.5 on the first five
        slots = torch.stack([DECODE_ROWS, torch.tensor([1] * 5 + [-1] * 5)])
        scales = torch.tensor([[1.0] * 10, [0.5] * 5 + [1.0] * 5])
    x, y = torch.randn(10, D_IN), torch.randn(10, D_OUT)
    for _ in range(2):
        batch = LoraBatch.build(slots, token_scales=scales)
        assert layer.stacked(batch) is not None
        expected = add_lora_reference(y, x, layer.lora_a, layer.lora_b, slots, scales)
        torch.testing.assert_close(layer.add_delta(y.clone(), x, batch), expected, atol=1e-5, rtol=1e-5)
        layer.set_slot(2, LoraWeights(torch.randn(6, D_IN), torch.randn(6, D_OUT)))


def test_steps_the_stacked_op_would_not_pay_for_take_the_runs():
    """One run, prompt-sized steps, ranks past the column limit, LoRA biases: add_lora's runs."""
    from adapters.batch import STACK_MAX_COLUMNS, STACK_MAX_ROWS  # noqa: PLC0415

    layer = _layer_with_slots()
    assert layer.stacked(LoraBatch.build(torch.full((4,), 1))) is None
    assert layer.stacked(LoraBatch.build(torch.tensor([0, 1] * (STACK_MAX_ROWS // 2 + 1)).sort().values)) is None
    assert layer.stacked(LoraBatch.build(DECODE_ROWS)) is not None
    layer.slot_ranks = [STACK_MAX_COLUMNS] * NUM_SLOTS  # what wide adapters would declare
    assert layer.stacked(LoraBatch.build(DECODE_ROWS)) is None
    assert _layer_with_slots(bias_slot=2).stacked(LoraBatch.build(DECODE_ROWS)) is None


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_a_slot_loaded_at_a_lower_rank_keeps_zeros_past_it(kind):
    """set_slot writes only the rows that change: loading rank 2 over rank 6, then clearing, must
    leave nothing of the old factors past the new rank (the gather ops read max-rank rows)."""
    from torch import nn  # noqa: PLC0415

    from adapters.embedding import LoraEmbedding  # noqa: PLC0415
    from adapters.layer import LoraLinear  # noqa: PLC0415
    from adapters.peft_format import LoraWeights  # noqa: PLC0415
    from adapters.slots import LoraState  # noqa: PLC0415

    base = nn.Linear(D_IN, D_OUT) if kind == "linear" else nn.Embedding(D_IN, D_OUT)
    layer = (LoraLinear if kind == "linear" else LoraEmbedding)(base, LoraState(), NUM_SLOTS, MAX_RANK)
    layer.set_slot(0, LoraWeights(torch.randn(5, D_IN), torch.randn(5, D_OUT)))  # a neighbour, untouched
    neighbour = layer.slot_a(0, MAX_RANK).clone(), layer.lora_b[0].clone()
    for rank in (6, 2, None):
        # B as a parse leaves it: a transposed view of the file's [out, r], its scale still to apply
        weights = (
            None if rank is None else LoraWeights(torch.randn(rank, D_IN), torch.randn(D_OUT, rank).t(), scale=0.5)
        )
        layer.set_slot(1, weights)
        rank = rank or 0
        want_a, want_b = torch.zeros(MAX_RANK, D_IN), torch.zeros(MAX_RANK, D_OUT)
        if weights is not None:
            want_a[:rank], want_b[:rank] = weights.a, weights.b * 0.5
        assert torch.equal(layer.slot_a(1, MAX_RANK), want_a) and torch.equal(layer.lora_b[1], want_b)
        assert layer.slot_ranks[1] == rank
    assert torch.equal(layer.slot_a(0, MAX_RANK), neighbour[0]) and torch.equal(layer.lora_b[0], neighbour[1])
