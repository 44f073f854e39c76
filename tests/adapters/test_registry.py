"""AdapterRegistry: bounded device slots (LRU over unused ones), a bounded host cache that reloads
from the source, pinning, removal that really frees memory, replacement, and merged-slot eviction."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

import adapters.registry
from adapters import AdapterCapacityError, AdapterExistsError, AdapterNotFoundError, AdapterRegistry, wrap_model
from server.http.errors import status_and_code

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


@pytest.fixture(scope="module")
def paths(tiny_llama, tmp_path_factory, make_peft_adapter):
    root = tmp_path_factory.mktemp("registry")
    kinds = dict(
        a=dict(r=4, target_modules=["q_proj", "v_proj"]),
        b=dict(r=8, target_modules="all-linear"),
        c=dict(r=2, target_modules=["o_proj", "down_proj"]),
        d=dict(r=6, target_modules=["k_proj"]),
        e=dict(r=3, target_modules=["up_proj"], use_rslora=True),
    )
    return {name: make_peft_adapter(tiny_llama, root / name, lora_alpha=8, **kw) for name, kw in kinds.items()}


@pytest.fixture
def make_registry(tiny_llama, paths):
    def make(max_loras=2, max_cpu_loras=16, names="abcde"):
        registry = AdapterRegistry(
            wrap_model(copy.deepcopy(tiny_llama), max_loras=max_loras, max_rank=8), max_cpu_loras=max_cpu_loras
        )
        for name in names:
            registry.add(name, paths[name])
        return registry

    return make


@pytest.fixture
def disk_loads(monkeypatch):
    """Names passed to load_adapter (a parse of the adapter's files), and weakrefs to what it returned."""
    loads, refs = [], []

    def spy(name, *args, **kwargs):
        adapter = load_adapter(name, *args, **kwargs)
        loads.append(name)
        refs.append((name, weakref.ref(adapter)))
        return adapter

    load_adapter = adapters.registry.load_adapter
    monkeypatch.setattr(adapters.registry, "load_adapter", spy)
    return loads, refs


@torch.no_grad()
def run_slot(registry, slot, ids):
    lora_model = registry.lora_model
    with lora_model.gather(lora_model.build_batch(torch.full((ids.numel(),), slot))):
        return lora_model.model(ids).logits


def use(registry, name, ids):
    """One request: acquire, run every row on the adapter, release."""
    lease = registry.acquire(name)
    try:
        return run_slot(registry, lease.slot, ids)
    finally:
        registry.release(lease)


def slot_is_zero(registry, slot):
    layers = registry.lora_model.layers.values()
    return all(
        not layer.lora_a[slot].any() and not layer.lora_b[slot].any() for layer in layers if layer.lora_a is not None
    )


def test_slots_are_bounded_with_lru_eviction(make_registry, token_ids):
    registry = make_registry(max_loras=2)
    first_a = use(registry, "a", token_ids)
    use(registry, "b", token_ids)
    assert registry.resident() == ["a", "b"] and (registry.num_loads, registry.num_evictions) == (2, 0)

    use(registry, "c", token_ids)  # a is least recently used
    assert registry.resident() == ["c", "b"] and registry.info("a").slot is None
    use(registry, "b", token_ids)  # a hit: no load, and b becomes most recent
    assert (registry.num_loads, registry.num_evictions) == (3, 1)
    assert torch.equal(use(registry, "a", token_ids), first_a)  # evicts c, not b
    assert registry.resident() == ["a", "b"] and (registry.num_loads, registry.num_evictions) == (4, 2)


def test_a_slot_taken_from_an_adapter_holds_what_a_fresh_slot_would(make_registry, token_ids):
    """An evicted adapter's rows are overwritten by the load, not cleared first: the rows it leaves
    past the new rank, and the layers the new adapter does not target, must be zero as in a fresh
    slot (kernels that read a slot's whole max-rank rows rely on it), and outputs must not change."""
    registry = make_registry(max_loras=1)
    use(registry, "b", token_ids)  # rank 8 on every linear layer
    for name in "ca":  # rank 2 on o_proj and down_proj; rank 4 on q_proj and v_proj
        fresh = make_registry(max_loras=1)
        assert torch.equal(use(registry, name, token_ids), use(fresh, name, token_ids))
        for layer, fresh_layer in zip(registry.lora_model.layers.values(), fresh.lora_model.layers.values()):
            if fresh_layer.lora_a is None:  # the adapter does not target it
                assert layer.lora_a is None or not (layer.lora_a[0].any() or layer.lora_b[0].any())
            else:
                assert torch.equal(layer.lora_a[0], fresh_layer.lora_a[0])
                assert torch.equal(layer.lora_b[0], fresh_layer.lora_b[0])
    assert registry.num_evictions == 2


def test_acquired_adapter_is_never_evicted(make_registry, token_ids):
    registry = make_registry(max_loras=2)
    lease = registry.acquire("a")  # held, and the least recently acquired from here on
    expected = run_slot(registry, lease.slot, token_ids)
    for name in "bcde":
        use(registry, name, token_ids)
        assert registry.resident() == ["a", name]
    assert torch.equal(run_slot(registry, lease.slot, token_ids), expected)
    registry.release(lease)
    use(registry, "b", token_ids)
    assert registry.resident() == ["b", "e"]


def test_capacity_error_when_every_slot_is_held_or_pinned(make_registry, token_ids):
    registry = make_registry(max_loras=2)
    registry.set_pinned("a", True)
    use(registry, "a", token_ids)  # pinned: resident but not evictable
    held = registry.acquire("b")
    before = (registry.resident(), registry.num_loads, registry.num_evictions)
    with pytest.raises(AdapterCapacityError) as raised:
        registry.acquire("c")
    assert status_and_code(raised.value)[0] == 503
    assert (registry.resident(), registry.num_loads, registry.num_evictions) == before
    assert registry.info("c").slot is None

    registry.release(held)
    assert registry.acquire("c").slot == 1 and registry.resident() == ["a", "c"]


@pytest.mark.parametrize("kind", ["directory", "upload"])
def test_host_cache_is_bounded_and_reloads_on_demand(make_registry, paths, disk_loads, token_ids, kind):
    loads, _ = disk_loads
    registry = make_registry(max_loras=1, max_cpu_loras=2, names="")
    sources = {
        name: paths[name]
        if kind == "directory"
        else {file: (paths[name] / file).read_bytes() for file in (CONFIG, WEIGHTS)}
        for name in "abc"
    }
    registry.add("a", sources["a"])
    first_a = use(registry, "a", token_ids)
    registry.add("b", sources["b"])
    registry.add("c", sources["c"])
    assert sorted(registry.host_cached()) == ["b", "c"]
    assert registry.info("a").in_host_memory is False and registry.info("a").slot == 0  # still on device

    use(registry, "b", token_ids)  # evicts a from its slot; b comes from host memory
    assert loads == ["a", "b", "c"]
    assert torch.equal(use(registry, "a", token_ids), first_a)  # parsed again from its source
    assert loads == ["a", "b", "c", "a"]
    assert len(registry.host_cached()) == 2 and "a" in registry.host_cached()


def test_no_host_cache_parses_from_the_source_on_every_placement(make_registry, disk_loads, token_ids):
    loads, _ = disk_loads
    registry = make_registry(max_loras=1, max_cpu_loras=0, names="ab")
    assert registry.host_cached() == []
    first_a = use(registry, "a", token_ids)
    use(registry, "b", token_ids)
    assert torch.equal(use(registry, "a", token_ids), first_a)
    assert loads == ["a", "b", "a", "b", "a"] and registry.host_cached() == []


def test_pinned_adapter_keeps_host_copy_and_slot(make_registry, paths, disk_loads, token_ids):
    loads, _ = disk_loads
    registry = make_registry(max_loras=2, max_cpu_loras=1, names="")
    for name in "abcd":
        registry.add(name, paths[name], pinned=name == "a")
    assert sorted(registry.host_cached()) == ["a", "d"] and registry.info("a").pinned
    use(registry, "a", token_ids)
    for name in "bcd":
        use(registry, name, token_ids)
        assert registry.resident()[0] == "a" and "a" in registry.host_cached()
    assert loads.count("a") == 1

    registry.set_pinned("a", False)
    assert registry.host_cached() == ["d"]
    use(registry, "b", token_ids)  # a, the least recently acquired slot, may go now
    assert registry.resident() == ["b", "d"]
    num_c_loads = loads.count("c")
    registry.set_pinned("c", True)  # pinning reloads the host copy
    assert loads.count("c") == num_c_loads + 1 and sorted(registry.host_cached()) == ["b", "c"]


def test_remove_frees_host_memory_and_slot(make_registry, disk_loads, token_ids, tiny_llama):
    _, refs = disk_loads
    registry = make_registry(max_loras=2)
    lease = registry.acquire("b")
    registry.release(lease)
    slot = lease.slot
    assert not slot_is_zero(registry, slot) and [name for name, _ in refs].count("b") == 1

    registry.remove("b")
    gc.collect()
    assert [ref() for name, ref in refs if name == "b"] == [None]
    assert slot_is_zero(registry, slot) and registry.lora_model.slot_ranks[slot] == 0
    assert registry.resident()[slot] is None and "b" not in registry.host_cached() and "b" not in registry
    with pytest.raises(AdapterNotFoundError):
        registry.acquire("b")
    with torch.no_grad():
        assert torch.equal(run_slot(registry, slot, token_ids), tiny_llama(token_ids).logits)


def test_remove_while_acquired_defers_freeing_until_release(make_registry, disk_loads, token_ids):
    _, refs = disk_loads
    registry = make_registry(max_loras=2)
    lease = registry.acquire("a")
    expected = run_slot(registry, lease.slot, token_ids)

    registry.remove("a")
    assert "a" not in registry and "a" not in [info.name for info in registry.list()]
    with pytest.raises(AdapterNotFoundError):
        registry.acquire("a")
    assert registry.resident()[lease.slot] == "a"  # the running request keeps its weights
    assert torch.equal(run_slot(registry, lease.slot, token_ids), expected)
    held_b = registry.acquire("b")
    with pytest.raises(AdapterCapacityError):  # a's slot is still held, b's is in use
        registry.acquire("c")
    registry.release(held_b)

    registry.release(lease)
    gc.collect()
    assert registry.resident()[lease.slot] is None and slot_is_zero(registry, lease.slot)
    assert [ref() for name, ref in refs if name == "a"] == [None]


def test_replace_swaps_in_new_weights(make_registry, paths, token_ids):
    registry = make_registry(max_loras=3, names="bc")
    registry.add("x", paths["a"])
    old = registry.acquire("x")
    old_output = run_slot(registry, old.slot, token_ids)
    with pytest.raises(AdapterExistsError):
        registry.add("x", paths["b"])
    assert registry.info("x").rank == 4

    registry.add("x", paths["b"], replace=True)
    assert registry.info("x").rank == 8 and registry.info("x").target_modules == registry.info("b").target_modules
    assert torch.equal(run_slot(registry, old.slot, token_ids), old_output)  # in-flight request unaffected
    new_output = use(registry, "x", token_ids)
    assert torch.equal(new_output, use(registry, "b", token_ids))
    assert not torch.equal(new_output, old_output)

    registry.release(old)
    assert registry.resident().count("x") == 1 and slot_is_zero(registry, old.slot)


@pytest.mark.parametrize("mixed", [False, True], ids=["slot", "mix"])  # a composition's merge holds the slot too
@pytest.mark.parametrize("how", ["evicted", "removed", "replaced"])
def test_dropping_a_merged_slot_unmerges(make_registry, paths, token_ids, tiny_llama, how, mixed):
    registry = make_registry(max_loras=1, names="ab")
    lora_model = registry.lora_model
    lease = registry.acquire("a")
    lora_model.merge(((lease.slot, 0.5),) if mixed else lease.slot)
    registry.release(lease)
    with torch.no_grad():
        base = tiny_llama(token_ids).logits
        assert not torch.equal(lora_model.model(token_ids).logits, base)

    if how == "evicted":
        registry.release(registry.acquire("b"))
        assert registry.resident() == ["b"]
    elif how == "removed":
        registry.remove("a")
    else:
        registry.add("a", paths["c"], replace=True)
    assert lora_model.merged is None
    assert all(layer.merged_weight is None for layer in lora_model.layers.values())
    with torch.no_grad():
        assert torch.equal(lora_model.model(token_ids).logits, base)
