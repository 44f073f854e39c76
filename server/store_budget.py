"""The adapter store's byte budget (--adapter-store-max-bytes): adapters resolved from a source are
a cache of what lives elsewhere, so the least recently used of them leave the store when it is over
budget; an uploaded adapter exists nowhere else and is never evicted.

Which names are resolved, and when each was last used, is shared by replicas through the store
itself: an empty marker file `<root>/.resolved/<name>` per resolved adapter, its mtime the last use
(touched at most once a minute per name and process). An upload under the same name takes the
marker away. The budget counts the current version of every adapter. An evicted version stays on
disk only for EVICTED_GRACE_S (a replica that read the pointer just before may still be reading its
files), not the store's grace period of a deleted one: at the rate a fleet resolves, ten minutes of
evicted versions would hold many times the budget. Each replica removes what it evicted at its next
eviction pass, so the disk holds the budget plus what was evicted in the last EVICTED_GRACE_S.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from adapters import InvalidAdapterError
from server.store import VERSIONS, AdapterStore, check_name

RESOLVED = ".resolved"
TOUCH_EVERY_S = 60.0
EVICTED_GRACE_S = 10.0  # reading two files takes well under this; a replica holding one serves it from memory


class StoreBudget:
    """Evicts resolved adapters, least recently used first, until the store's adapters fit `max_bytes`."""

    def __init__(self, store: AdapterStore, max_bytes: int):
        self.store, self.max_bytes = store, max_bytes
        self._markers = store.root / RESOLVED
        self._markers.mkdir(exist_ok=True)
        if self._markers.is_symlink():
            raise InvalidAdapterError(f"{self._markers} is a link; it must be a real directory", field="adapter_store")
        self._touched: dict[str, float] = {}  # name -> monotonic time this process last touched its marker
        self._evicted: set[str] = set()  # names this process evicted whose old version may still be on disk
        self._lock = threading.Lock()  # evict's

    def mark_resolved(self, name: str) -> None:
        fd = os.open(self._markers / check_name(name), os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW, 0o644)
        os.close(fd)

    def forget(self, name: str) -> None:
        """An uploaded adapter under `name`: never evicted."""
        (self._markers / check_name(name)).unlink(missing_ok=True)

    def is_touch_due(self, name: str) -> bool:
        return time.monotonic() - self._touched.get(name, -TOUCH_EVERY_S) >= TOUCH_EVERY_S

    def touch(self, name: str) -> None:
        """Record a use of `name` (nothing for an uploaded adapter, which has no marker)."""
        self._touched[name] = time.monotonic()
        try:
            os.utime(self._markers / check_name(name), follow_symlinks=False)
        except FileNotFoundError:
            pass

    def stored_bytes(self) -> dict[str, int]:
        """Bytes of each stored adapter's current version."""
        sizes = {}
        for name in self.store.names():
            version = self.store.current(name)
            if version is not None:
                sizes[name] = sum(_size(path) for path in version.iterdir())
        return sizes

    def evict(self, keep: set[str]) -> tuple[list[str], int]:
        """Delete resolved adapters not in `keep`, least recently used first, until the store fits;
        returns their names and the bytes stored after. One pass at a time in this process (each
        resolution runs one, so they overlap under concurrent first requests)."""
        with self._lock:
            return self._evict(keep)

    def _evict(self, keep: set[str]) -> tuple[list[str], int]:
        self.reap()
        sizes = self.stored_bytes()
        total, evicted = sum(sizes.values()), []
        for name in self._least_recently_used(set(sizes) - keep):
            if total <= self.max_bytes:
                break
            self.store.delete(name)
            self.forget(name)
            total -= sizes[name]
            evicted.append(name)
        self._evicted.update(evicted)
        return evicted, total

    def reap(self) -> None:
        """Remove the old versions of names this process evicted once EVICTED_GRACE_S has passed.
        They are not counted against the budget meanwhile: an eviction frees nothing until then, so
        counting them made every pass within the grace evict again what the last one had (a 10-minute
        soak emptied the store to 4 adapters of a budget of 100, and evicted adapters just resolved)."""
        for name in list(self._evicted):
            self.store.collect(name, EVICTED_GRACE_S)  # never the current version, if it was resolved again
            current = self.store.version(name)
            try:
                left = [entry for entry in os.scandir(self.store.root / VERSIONS / name) if entry.name != current]
            except FileNotFoundError:
                left = []
            if not left:
                self._evicted.discard(name)

    def _least_recently_used(self, names: set[str]) -> list[str]:
        used = {}
        with os.scandir(self._markers) as entries:
            for entry in entries:
                if entry.name in names and entry.is_file(follow_symlinks=False):
                    try:
                        used[entry.name] = entry.stat(follow_symlinks=False).st_mtime
                    except FileNotFoundError:  # another replica's pass evicted it since the scan
                        continue
        return sorted(used, key=lambda name: (used[name], name))


def _size(path: Path) -> int:
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0
