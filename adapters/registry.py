"""AdapterRegistry: name -> adapter, with bounded device slots and a bounded host-memory LRU.

Three tiers, like a cache hierarchy: every registered adapter has a source (a directory, or an
upload's bytes); up to `max_cpu_loras` unpinned ones are parsed in host memory; up to `max_loras`
sit in device slots. Requests `acquire` an adapter (placing it in a slot if needed) and `release`
it; a slot is only reused once nobody holds it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterCapacityError, AdapterExistsError, AdapterNotFoundError
from .model import LoraModel
from .peft_format import AdapterSource, LoraAdapter, load_adapter


@dataclass(eq=False)
class _Entry:
    name: str
    source: AdapterSource
    rank: int
    target_modules: list[str]
    num_bytes: int
    pinned: bool = False
    adapter: LoraAdapter | None = None  # host copy, while cached
    slot: int | None = None
    num_users: int = 0
    removed: bool = False


@dataclass(frozen=True)
class AdapterInfo:
    """What the registry tells the outside about one adapter."""

    name: str
    rank: int
    target_modules: list[str]
    num_bytes: int
    pinned: bool
    slot: int | None
    in_host_memory: bool
    source: str | None = field(default=None)


@dataclass(frozen=True)
class AdapterLease:
    """Proof that a request holds an adapter in a device slot; give it back with `release`."""

    name: str
    slot: int
    entry: _Entry


class AdapterRegistry:
    """Thread-safe catalogue of adapters for one `LoraModel`."""

    def __init__(self, lora_model: LoraModel, *, max_cpu_loras: int = 16):
        self.lora_model = lora_model
        self.max_cpu_loras = max_cpu_loras
        self._entries: dict[str, _Entry] = {}
        self._slots: list[_Entry | None] = [None] * lora_model.max_loras
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # least recently acquired first
        self._host_lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        self.num_loads = self.num_evictions = 0

    @property
    def max_loras(self) -> int:
        return self.lora_model.max_loras

    def add(self, name: str, source: AdapterSource, *, replace: bool = False, pinned: bool = False) -> AdapterInfo:
        """Validate and register. Nothing is registered if validation fails."""
        with self._lock:
            if name in self._entries and not replace:
                raise AdapterExistsError(f"adapter {name!r} already exists")
        model = self.lora_model
        adapter = load_adapter(name, source, model.spec, max_rank=model.max_rank, dtype=_dtype(model))
        if not isinstance(source, Mapping):
            source = Path(source)
        entry = _Entry(name, source, adapter.rank, adapter.target_modules, adapter.num_bytes, pinned, adapter)
        with self._lock:
            if name in self._entries:
                if not replace:
                    raise AdapterExistsError(f"adapter {name!r} already exists")
                self._drop(self._entries[name])
            self._entries[name] = entry
            self._cache_host(entry)
            return self._info(entry)

    def remove(self, name: str) -> None:
        """Unregister now; the device slot is freed as soon as running requests release it."""
        with self._lock:
            self._drop(self._entry(name))

    def acquire(self, name: str) -> AdapterLease:
        """Ensure `name` is in a device slot and hold it there until `release`."""
        with self._lock:
            entry = self._entry(name)
            if entry.slot is None:
                self._place(entry)
            entry.num_users += 1
            self._slot_lru.pop(entry.slot, None)
            self._slot_lru[entry.slot] = None
            return AdapterLease(name, entry.slot, entry)

    def release(self, lease: AdapterLease) -> None:
        with self._lock:
            entry = lease.entry
            entry.num_users -= 1
            assert entry.num_users >= 0, f"adapter {entry.name!r} released more often than acquired"
            if entry.removed and entry.num_users == 0:
                self._free_slot(entry)

    def set_pinned(self, name: str, pinned: bool) -> None:
        """A pinned adapter stays in host memory and, once placed, in its device slot."""
        with self._lock:
            entry = self._entry(name)
            entry.pinned = pinned
            if pinned:
                self._load_host(entry)
            self._trim_host()

    def info(self, name: str) -> AdapterInfo:
        with self._lock:
            return self._info(self._entry(name))

    def list(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(e) for e in sorted(self._entries.values(), key=lambda e: e.name)]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def resident(self) -> list[str | None]:
        """Adapter name per device slot (None = free)."""
        with self._lock:
            return [e.name if e else None for e in self._slots]

    def host_cached(self) -> list[str]:
        with self._lock:
            return [e.name for e in self._entries.values() if e.adapter is not None]

    # Internals; callers hold the lock.
    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {name!r} does not exist")
        return entry

    def _place(self, entry: _Entry) -> None:
        slot = self._free_slot_index()
        adapter = self._load_host(entry)
        self.lora_model.load_slot(slot, adapter)
        self._slots[slot], entry.slot = entry, slot
        self.num_loads += 1
        self._trim_host()

    def _free_slot_index(self) -> int:
        for slot, holder in enumerate(self._slots):  # lowest first: keeps slot ids a prefix
            if holder is None:
                return slot
        for slot in self._slot_lru:
            holder = self._slots[slot]
            if holder.num_users == 0 and not holder.pinned:
                self._free_slot(holder)
                self.num_evictions += 1
                return slot
        raise AdapterCapacityError(f"all {len(self._slots)} adapter slots are pinned or in use")

    def _free_slot(self, entry: _Entry) -> None:
        if entry.slot is None:
            return
        self.lora_model.clear_slot(entry.slot)
        self._slots[entry.slot] = None
        self._slot_lru.pop(entry.slot, None)
        entry.slot = None

    def _load_host(self, entry: _Entry) -> LoraAdapter:
        adapter = entry.adapter
        if adapter is None:
            model = self.lora_model
            adapter = entry.adapter = load_adapter(entry.name, entry.source, model.spec,
                                                   max_rank=model.max_rank, dtype=_dtype(model))
        self._cache_host(entry)  # may drop entry.adapter again (max_cpu_loras=0): return our reference
        return adapter

    def _cache_host(self, entry: _Entry) -> None:
        self._host_lru.pop(entry.name, None)
        self._host_lru[entry.name] = None
        self._trim_host()

    def _trim_host(self) -> None:
        evictable = [n for n in self._host_lru if not self._entries[n].pinned]
        for name in evictable[:max(0, len(evictable) - self.max_cpu_loras)]:
            self._entries[name].adapter = None
            del self._host_lru[name]

    def _drop(self, entry: _Entry) -> None:
        entry.removed = True
        entry.adapter = None
        self._host_lru.pop(entry.name, None)
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        if entry.num_users == 0:
            self._free_slot(entry)

    def _info(self, entry: _Entry) -> AdapterInfo:
        source = None if isinstance(entry.source, Mapping) else str(entry.source)
        return AdapterInfo(entry.name, entry.rank, entry.target_modules, entry.num_bytes,
                           entry.pinned, entry.slot, entry.adapter is not None, source)


def _dtype(model: LoraModel):
    return next(model.model.parameters()).dtype
