"""AdapterRegistry: name -> adapter version, with bounded device slots and a bounded host-memory LRU.

Three tiers, like a cache hierarchy: every registered adapter has a source (a directory, or an
upload's bytes); up to `max_cpu_loras` unpinned ones are parsed in host memory; up to `max_loras`
sit in device slots. Requests `acquire` an adapter (placing it in a slot if needed) and `release`
it; a slot is only reused once nobody holds it.

Each registration is an `AdapterVersion`. A request `bind`s the version current when it was
admitted and keeps it through preemption and recompute: replacing or removing the name only
changes what *new* requests get, and an old version (its host copy kept) lives until its last
request `unbind`s it. One thread (the engine's) mutates the registry; the lock only makes reads
from other threads consistent.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import AdapterCapacityError, AdapterExistsError, AdapterNotFoundError
from .model import LoraModel
from .parse_ahead import FileChecks
from .peft_format import AdapterSource, LoraAdapter, load_adapter


@dataclass(eq=False)
class AdapterVersion:
    """One registration of a name; replacing the name makes a new version."""

    name: str
    source: AdapterSource
    rank: int
    target_modules: list[str]
    num_bytes: int
    pinned: bool = False
    adapter: LoraAdapter | None = None  # host copy, while cached
    slot: int | None = None
    num_users: int = 0  # leases: requests that hold its device slot right now
    num_requests: int = 0  # bound requests (running, waiting or preempted) that will need it again
    removed: bool = False  # replaced or removed: no new request binds it
    num_params: int = 0
    identity: bytes = b""  # digest of its config and weights (identity.py): keys its prefix-cached K/V
    num_loads: int = 0  # times it was loaded into a device slot


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
    entry: AdapterVersion


class AdapterRegistry:
    """Thread-safe catalogue of adapters for one `LoraModel`."""

    def __init__(self, lora_model: LoraModel, *, max_cpu_loras: int = 16):
        self.lora_model = lora_model
        self.max_cpu_loras = max_cpu_loras
        self._entries: dict[str, AdapterVersion] = {}
        self._slots: list[AdapterVersion | None] = [None] * lora_model.max_loras
        self._slot_lru: OrderedDict[int, None] = OrderedDict()  # least recently acquired first
        self._host_lru: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.RLock()
        self._prepared: dict[int, tuple[AdapterVersion, LoraAdapter]] = {}  # id(version) -> its host copy
        self.num_loads = self.num_evictions = 0

    @property
    def max_loras(self) -> int:
        return self.lora_model.max_loras

    def add(self, name: str, source: AdapterSource, *, replace: bool = False, pinned: bool = False) -> AdapterInfo:
        """Validate and register. Nothing is registered if validation fails."""
        if name in self._entries and not replace:
            raise AdapterExistsError(f"adapter {name!r} already exists")
        return self.install(name, self.parse(name, source), source, replace=replace, pinned=pinned)

    def parse(self, name: str, source: AdapterSource, checks: FileChecks | None = None) -> LoraAdapter:
        """Read and validate `source` for this model: file IO and CPU work, safe on any thread.
        `checks`: what a `ParseAhead` read of the weights while they arrived."""
        model = self.lora_model
        return load_adapter(name, source, model.spec, max_rank=model.max_rank, dtype=_dtype(model), checks=checks)

    def was_loaded(self, name: str) -> bool:
        """Whether `name`'s current version has been in a device slot (a step ran it), or is gone."""
        with self._lock:
            entry = self._entries.get(name)
            return entry is None or entry.num_loads > 0

    def needs_host_read(self, name: str) -> bool:
        """Whether `name`'s current version must be read back into host memory (its copy was evicted
        and none is prepared): a cheap check, so requests whose copy is there skip the worker hop."""
        with self._lock:
            return self._evicted(self._entries.get(name))

    def prepare_host(self, name: str) -> None:
        """Read `name`'s current version back into host memory if its copy was evicted: file IO and
        CPU work for a worker thread, so that the engine thread's `bind` only takes the result."""
        with self._lock:
            entry = self._entries.get(name)
            if not self._evicted(entry):
                return
        adapter = self.parse(name, entry.source)
        with self._lock:
            if entry.adapter is None and not entry.removed:
                self._prepared[id(entry)] = (entry, adapter)  # keyed by id: a version is not hashable by value

    def install(
        self, name: str, adapter: LoraAdapter, source: AdapterSource, *, replace: bool = False, pinned: bool = False
    ) -> AdapterInfo:
        """Register an adapter that `parse` returned: no IO, so the engine thread can do it between steps."""
        if not isinstance(source, Mapping):
            source = Path(source)
        entry = AdapterVersion(
            name,
            source,
            adapter.rank,
            adapter.target_modules,
            adapter.num_bytes,
            pinned,
            adapter,
            num_params=adapter.num_params,
            identity=adapter.identity,
        )
        with self._lock:
            if name in self._entries:
                if not replace:
                    raise AdapterExistsError(f"adapter {name!r} already exists")
                self._drop(self._entries[name])
            self._entries[name] = entry
            self._cache_host(entry)
            return self._info(entry)

    def relocate(self, name: str, adapter: LoraAdapter, source: AdapterSource) -> bool:
        """Point the current version of `name`, installed from `adapter`, at `source`: a copy of the
        files it was parsed from (a resolved adapter's, stored after it was served from memory). Its
        host copy is read back from there once evicted. False if `name` no longer holds that version."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.identity != adapter.identity:
                return False
            entry.source = source if isinstance(source, Mapping) else Path(source)
            return True

    def remove(self, name: str) -> None:
        """Unregister now; requests bound to it finish on it, and its slot is freed after them."""
        with self._lock:
            self._drop(self._entry(name))

    def bind(self, name: str) -> AdapterVersion:
        """The current version of `name`, held for one request until `unbind`."""
        with self._lock:
            entry = self._entry(name)
            entry.num_requests += 1
            self._load_host(entry)  # kept while bound: its source may not outlive a replace or delete
            return entry

    def unbind(self, entry: AdapterVersion) -> None:
        with self._lock:
            entry.num_requests -= 1
            assert entry.num_requests >= 0, f"adapter {entry.name!r} unbound more often than bound"
            self._forget_if_unused(entry)

    def acquire(self, adapter: str | AdapterVersion) -> AdapterLease:
        """Ensure the adapter (a name's current version, or a bound version) is in a device slot and
        hold it there until `release`."""
        with self._lock:
            entry = self._entry(adapter) if isinstance(adapter, str) else adapter
            if entry.slot is None:
                self._place(entry)
            entry.num_users += 1
            self._slot_lru.pop(entry.slot, None)
            self._slot_lru[entry.slot] = None
            return AdapterLease(entry.name, entry.slot, entry)

    def release(self, lease: AdapterLease) -> None:
        with self._lock:
            entry = lease.entry
            entry.num_users -= 1
            assert entry.num_users >= 0, f"adapter {entry.name!r} released more often than acquired"
            self._forget_if_unused(entry)

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

    def version(self, name: str) -> AdapterVersion:
        """The current version of `name`, to key work done off the engine thread (analysis) by version;
        read-only: binding it for a request is `bind`."""
        with self._lock:
            return self._entry(name)

    def sizes(self) -> dict[str, tuple[int, int]]:
        """(rank, parameter count) of each adapter in a device slot or in host memory."""
        with self._lock:
            return {
                e.name: (e.rank, e.num_params)
                for e in self._entries.values()
                if e.slot is not None or e.adapter is not None
            }

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

    def held(self) -> dict[str, int]:
        """Leases held right now per adapter name, replaced or removed versions included: {} when idle."""
        with self._lock:
            return {e.name: e.num_users for e in self._slots if e is not None and e.num_users}

    def host_cached(self) -> list[str]:
        with self._lock:
            return [e.name for e in self._entries.values() if e.adapter is not None]

    # Internals; callers hold the lock.
    def _entry(self, name: str) -> AdapterVersion:
        entry = self._entries.get(name)
        if entry is None:
            raise AdapterNotFoundError(f"adapter {name!r} does not exist")
        return entry

    def _place(self, entry: AdapterVersion) -> None:
        adapter = self._load_host(entry)
        slot = self._free_slot_index()
        try:
            self.lora_model.load_slot(slot, adapter)  # writes every layer's rows of the slot, zeros included
        except BaseException:
            self.lora_model.clear_slot(slot)  # an evicted adapter's rows must not stay behind half-written
            raise
        self._slots[slot], entry.slot = entry, slot
        entry.num_loads += 1
        self.num_loads += 1
        self._trim_host()

    def _free_slot_index(self) -> int:
        """A slot for a load that follows at once: an empty one, else the least recently used one no
        request holds, taken from its adapter without clearing its rows, which the load overwrites
        (clearing first wrote the evicted adapter's rows twice: ~10 ms of a 29 MB adapter's first
        request on the Intel Xeon, 30-50 ms while the store's write of it ran beside)."""
        for slot, holder in enumerate(self._slots):  # lowest first: keeps slot ids a prefix
            if holder is None:
                return slot
        for slot in self._slot_lru:
            holder = self._slots[slot]
            if holder.num_users == 0 and not holder.pinned:
                self._free_slot(holder, clear=False)
                self.num_evictions += 1
                return slot
        raise AdapterCapacityError(f"all {len(self._slots)} adapter slots are pinned or in use")

    def _free_slot(self, entry: AdapterVersion, clear: bool = True) -> None:
        if entry.slot is None:
            return
        if clear:
            self.lora_model.clear_slot(entry.slot)
        self._slots[entry.slot] = None
        self._slot_lru.pop(entry.slot, None)
        entry.slot = None

    def _evicted(self, entry: AdapterVersion | None) -> bool:
        return entry is not None and entry.adapter is None and id(entry) not in self._prepared

    def _load_host(self, entry: AdapterVersion) -> LoraAdapter:
        adapter = entry.adapter
        prepared = self._prepared.pop(id(entry), None)
        if adapter is None and prepared is not None and prepared[0] is entry:
            adapter = entry.adapter = prepared[1]
            entry.identity = adapter.identity
        if adapter is None:
            model = self.lora_model
            adapter = entry.adapter = load_adapter(
                entry.name, entry.source, model.spec, max_rank=model.max_rank, dtype=_dtype(model)
            )
            # A directory source can change on disk while its host copy was dropped: cached K/V must
            # follow what is computed now, not what was read at install.
            entry.identity = adapter.identity
        if not entry.removed:
            self._cache_host(entry)  # may drop entry.adapter again (max_cpu_loras=0): return our reference
        return adapter

    def _cache_host(self, entry: AdapterVersion) -> None:
        self._host_lru.pop(entry.name, None)
        self._host_lru[entry.name] = None
        self._trim_host()

    def _trim_host(self) -> None:
        evictable = [n for n in self._host_lru if not self._entries[n].pinned and not self._entries[n].num_requests]
        for name in evictable[: max(0, len(evictable) - self.max_cpu_loras)]:
            self._entries[name].adapter = None
            del self._host_lru[name]

    def _drop(self, entry: AdapterVersion) -> None:
        entry.removed = True
        self._prepared.pop(id(entry), None)
        self._host_lru.pop(entry.name, None)  # out of the LRU: its host copy now lives as long as its requests
        if self._entries.get(entry.name) is entry:
            del self._entries[entry.name]
        self._forget_if_unused(entry)

    def _forget_if_unused(self, entry: AdapterVersion) -> None:
        if entry.removed and entry.num_users == 0 and entry.num_requests == 0:
            entry.adapter = None
            self._free_slot(entry)

    def _info(self, entry: AdapterVersion) -> AdapterInfo:
        source = None if isinstance(entry.source, Mapping) else str(entry.source)
        return AdapterInfo(
            entry.name,
            entry.rank,
            entry.target_modules,
            entry.num_bytes,
            entry.pinned,
            entry.slot,
            entry.adapter is not None,
            source,
        )


def _dtype(model: LoraModel):
    return next(model.model.parameters()).dtype
