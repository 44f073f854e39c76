"""The store's byte budget on a real store directory: least recently used resolved adapters leave
first; uploaded ones (no marker, or one taken away by an upload) and kept ones never do."""

from __future__ import annotations

import os
import time

from server import store_budget
from server.store import AdapterStore
from server.store_budget import RESOLVED, StoreBudget

ONE = 1000  # bytes per adapter below: config 10 + weights 990


def _files() -> dict[str, bytes]:
    return {"adapter_config.json": b"x" * 10, "adapter_model.safetensors": b"y" * (ONE - 10)}


def _resolved(store: AdapterStore, budget: StoreBudget, name: str, used_at: float) -> None:
    store.save(name, _files())
    budget.mark_resolved(name)
    os.utime(store.root / RESOLVED / name, (used_at, used_at))


def test_evicts_least_recently_used_resolved_adapters_until_the_store_fits(tmp_path):
    store = AdapterStore(tmp_path)
    budget = StoreBudget(store, max_bytes=3 * ONE)
    store.save("uploaded", _files())
    now = time.time()
    for age, name in ((30, "old"), (20, "middle"), (10, "recent"), (0, "newest")):
        _resolved(store, budget, name, now - age)
    evicted, stored = budget.evict(keep={"newest"})
    assert evicted == ["old", "middle"] and stored == 3 * ONE
    assert set(store.names()) == {"uploaded", "recent", "newest"}
    assert not (tmp_path / RESOLVED / "old").exists()


def test_touch_makes_an_adapter_recent_and_uploads_and_kept_names_never_leave(tmp_path):
    store = AdapterStore(tmp_path)
    budget = StoreBudget(store, max_bytes=2 * ONE)
    now = time.time()
    _resolved(store, budget, "a", now - 20)
    _resolved(store, budget, "b", now - 10)
    _resolved(store, budget, "replaced-by-upload", now - 30)
    budget.forget("replaced-by-upload")  # what an upload over a resolved name does
    assert budget.is_touch_due("a")
    budget.touch("a")  # now more recent than b
    assert not budget.is_touch_due("a")
    evicted, stored = budget.evict(keep=set())
    assert evicted == ["b"] and set(store.names()) == {"a", "replaced-by-upload"} and stored == 2 * ONE
    budget.max_bytes = ONE // 2
    evicted, stored = budget.evict(keep={"a"})
    assert evicted == [] and stored == 2 * ONE  # over budget: what is left is kept or uploaded, and stays


def test_an_evicted_version_leaves_the_disk_after_a_short_grace_not_the_stores(tmp_path, monkeypatch):
    """The disk, old versions included, stays near the budget: what the budget evicted is removed at
    its next pass once EVICTED_GRACE_S has passed (the store's own grace for a delete is 10 minutes),
    and is not counted meanwhile (counting it made each pass evict again what the last one had)."""
    store = AdapterStore(tmp_path)
    budget = StoreBudget(store, max_bytes=2 * ONE)
    now = time.time()
    for age, name in ((40, "a"), (30, "b"), (20, "c")):
        _resolved(store, budget, name, now - age)
    assert budget.evict(keep=set())[0] == ["a"]
    assert _on_disk(tmp_path) == 3 * ONE  # "a" is still readable for a replica that just read its pointer
    _resolved(store, budget, "d", now)
    assert budget.evict(keep={"d"}) == (["b"], 2 * ONE)  # one out for one in, the evicted "a" aside
    monkeypatch.setattr(store_budget, "EVICTED_GRACE_S", 0.0)
    assert budget.evict(keep=set()) == ([], 2 * ONE)  # the grace is over: the evicted versions are removed
    assert _on_disk(tmp_path) == 2 * ONE and set(store.names()) == {"c", "d"}


def _on_disk(root) -> int:
    return sum(f.stat().st_size for f in (root / ".versions").rglob("*") if f.is_file())
