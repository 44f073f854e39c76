"""Uploaded adapters on disk, safe for concurrent writers and for replicas sharing one volume.

Layout:
    <root>/<name>                        symlink -> .versions/<name>/<version> (the pointer)
    <root>/.versions/<name>/<version>/   adapter_config.json, adapter_model.safetensors
    <root>/.staging-<version>/           an upload being written
    <root>/.staging-<version>.lock       flock-held by the uploading process for the upload's life
    <root>/.compositions/<name>.json     a named composition: [{"name": adapter, "scale": s}, ...]

A version directory is written once in staging (every file fsynced), renamed into .versions and never
changed again. The pointer is created with os.symlink, which fails if the name exists, so the
filesystem decides which of two concurrent creators wins; a replace switches it with one atomic
rename, so a reader sees the old version or the new one, never a gap or a mix. `path(name)` resolves
the pointer: a loader that reads through it reads one version even if a replace lands meanwhile.

A replaced or deleted version stays loadable for `grace_s` seconds (another replica may have resolved
it just before the switch); the next save or delete of that name, or the next sweep, removes it. Staging and
orphaned versions are removed only when no live upload holds their lock and they are older than
`grace_s`: flock is shared by NFS clients (Linux maps it to byte-range locks), and the age is the
backstop where it is not, or where the holder is this same process.

Every link is checked before it is followed, read or removed: a pointer counts only if it names
`.versions/<name>/<version>` of its own name, and `.versions`, `.compositions` and the files in them
must not be links. Anything else in the root (a link planted by hand, `evil -> ../victim`) is
ignored and logged, so neither a read nor a delete can reach outside the store.

A composition is one small JSON file, written to a temporary name (fsynced) and then linked into
place (create: os.link fails if the name exists, so one creator wins) or renamed over it (replace).
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from adapters import AdapterExistsError, InvalidAdapterError
from adapters.config import CONFIG_FILE
from adapters.peft_format import WEIGHTS_FILE

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # fullmatch: `$` would admit "name\n"
VERSION_PATTERN = re.compile(r"[0-9]{20}-[0-9a-f]{32}")  # what _new_version makes
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
VERSIONS = ".versions"
COMPOSITIONS = ".compositions"
RESOLVING = ".resolving"  # one flock file per name a source was asked for: one fetch per fleet
STAGING = ".staging-"
LOCK = ".lock"
TEMPORARY_LINKS = (".link-", ".deleting-")
DEFAULT_GRACE_S = 600.0

log = logging.getLogger(__name__)


def check_name(name: str) -> str:
    """Adapter names become directory names and URL parts: no separators, no '..'."""
    if not is_valid_name(name):
        raise InvalidAdapterError(
            "must be 1-128 characters of letters, digits, '.', '_' or '-', "
            "start with a letter or digit, and not contain '..'",
            field="name",
        )
    return name


def is_valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.fullmatch(name)) and ".." not in name


class AdapterStore:
    """A directory of adapters that survives restarts and can be shared by replicas."""

    def __init__(self, root: Path, grace_s: float = DEFAULT_GRACE_S):
        self.root = Path(root)
        self.grace_s = grace_s
        self._versions = self.root / VERSIONS
        self._versions.mkdir(parents=True, exist_ok=True)
        _refuse_link(self._versions)
        self._migrate_unversioned()
        self.sweep()

    def path(self, name: str) -> Path:
        """The current version's directory, whose content never changes; <root>/<name> if absent."""
        target = self._pointer(name)
        return self.root / (target or name)

    def current(self, name: str) -> Path | None:
        """The current version's directory (its name is the version id), None if absent: one readlink,
        so the version and the files it names can never come from two different saves."""
        target = self._pointer(name)
        return None if target is None else self.root / target

    def names(self) -> list[str]:
        with os.scandir(self.root) as entries:
            links = [e.name for e in entries if e.is_symlink() and is_valid_name(e.name)]
        return sorted(name for name in links if self._pointer(name) is not None)

    def version(self, name: str) -> str | None:
        """The current version's id, None if absent: one readlink, and a new id on every save."""
        target = self._pointer(name)
        return None if target is None else Path(target).name

    def __contains__(self, name: str) -> bool:
        return self.version(name) is not None

    # Named compositions: ((adapter, scale), ...) under a name of their own.
    def compositions(self) -> dict[str, tuple[tuple[str, float], ...]]:
        """Every readable composition; a bad file (a replica's half-understood write, a hand edit) is
        skipped and logged, as a bad adapter is: one file must not keep a fleet from starting."""
        folder = self.root / COMPOSITIONS
        if folder.is_symlink() or not folder.is_dir():
            if folder.is_symlink():
                log.warning("ignoring %s: a link, which could lead out of the store", folder)
            return {}
        found = {}
        for path in sorted(folder.glob("*.json")):
            if not is_valid_name(path.stem):
                continue
            try:
                found[path.stem] = _read_composition(path)
            except (OSError, ValueError, TypeError, KeyError, RecursionError) as exc:
                log.warning("skipping stored composition %s: %s", path, exc)
        return found

    def save_composition(self, name: str, terms: tuple[tuple[str, float], ...], replace: bool = False) -> None:
        """Write atomically: readers see the old file or the new one; without `replace`, an existing
        name is an AdapterExistsError (also when another replica created it meanwhile). An adapter's
        name is never taken, replace or not: names are one namespace."""
        if name in self:
            raise AdapterExistsError(f"{name!r} is an adapter in the store; delete it first", field="name")
        folder = self.root / COMPOSITIONS
        folder.mkdir(exist_ok=True)
        temporary = folder / f".tmp-{_new_version()}"
        _write_synced(temporary, json.dumps([{"name": n, "scale": s} for n, s in terms]).encode())
        target = folder / f"{check_name(name)}.json"
        try:
            if replace:
                os.replace(temporary, target)
            else:
                os.link(temporary, target)
        except FileExistsError:
            raise AdapterExistsError(f"composition {name!r} already exists") from None
        finally:
            temporary.unlink(missing_ok=True)
        _fsync_dir(folder)

    def has_composition(self, name: str) -> bool:
        return (self.root / COMPOSITIONS / f"{check_name(name)}.json").exists()

    def delete_composition(self, name: str) -> None:
        (self.root / COMPOSITIONS / f"{check_name(name)}.json").unlink(missing_ok=True)
        _fsync_dir(self.root / COMPOSITIONS)

    def _pointer(self, name: str) -> str | None:
        """The pointer's target, `.versions/<name>/<version>`; None if absent or if it points anywhere
        else (a link planted by hand must never be followed out of the store)."""
        try:
            target = os.readlink(self.root / check_name(name))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # EINVAL: a directory written by a replica that predates versioning
            if exc.errno == errno.EINVAL:
                return None
            raise
        prefix = f"{VERSIONS}/{name}/"
        if not (target.startswith(prefix) and VERSION_PATTERN.fullmatch(target[len(prefix) :])):
            log.warning("ignoring %s -> %s: not a version of this store", self.root / name, target)
            return None
        if (self._versions / name).is_symlink():
            log.warning("ignoring %s: its versions folder is a link", self.root / name)
            return None
        return target

    def save(self, name: str, files: Mapping[str, bytes], replace: bool = False) -> Path:
        """Write a new version of `name` and point the name at it; returns the version's directory.

        replace=False raises AdapterExistsError if the name exists, also when a concurrent writer
        (another thread, process or replica) creates it first; with replace=True the last switch wins.
        A composition's name is never taken, replace or not: names are one namespace.
        """
        if self.has_composition(check_name(name)):
            raise AdapterExistsError(f"{name!r} is a composition in the store; delete it first", field="name")
        version = _new_version()
        with self._upload_lock(version):
            staging = self.root / f"{STAGING}{version}"
            staging.mkdir()
            try:
                for file_name in ADAPTER_FILES:
                    _write_synced(staging / file_name, files[file_name])
                _fsync_dir(staging)
                target = self._publish(name, version, staging)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            try:
                self._point(name, version, replace)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
        self._collect(name)
        return target

    def delete(self, name: str) -> None:
        """Take the pointer away in one rename (readers see the adapter or nothing). The version it
        named stays for `grace_s`, as a replaced one does: another replica may have just resolved it.
        Only a pointer of this store is taken: a foreign link is refused, never followed."""
        link = self.root / check_name(name)
        if link.is_symlink() and self._pointer(name) is None:
            raise InvalidAdapterError(
                f"{name!r} in the store is a link that does not point to one of its versions; remove it by hand",
                field="name",
            )
        previous = self.version(name)
        taken = self.root / f".deleting-{_new_version()}"
        try:
            os.rename(link, taken)
        except FileNotFoundError:
            return
        _fsync_dir(self.root)
        if taken.is_symlink():
            taken.unlink()
            if previous is not None:
                _touch(self._versions / name / previous)  # its grace period starts now
        else:  # a directory written by a replica that predates versioning
            shutil.rmtree(taken, ignore_errors=True)
        self._collect(name)

    def sweep(self) -> None:
        """Remove what dead uploads and deletes left behind; never what a live upload is using."""
        uploads, links = set(), []
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.startswith(STAGING):
                    uploads.add(entry.name[len(STAGING) :].removesuffix(LOCK))
                elif entry.name.startswith(TEMPORARY_LINKS):
                    links.append(Path(entry.path))
        for version in uploads:
            self._remove_if_dead(version, self.root / f"{STAGING}{version}", self._lock_path(version))
        for link in links:
            if _age(link) >= self.grace_s:
                link.unlink(missing_ok=True)
        for name_dir in self._versions.iterdir():
            if not name_dir.is_symlink():
                self._collect(name_dir.name)

    @contextmanager
    def resolving(self, name: str, timeout_s: float) -> Iterator[bool]:
        """Held by one process at a time, across replicas, while it fetches `name` from a source, so
        a fleet on this store fetches it once; yields False when `timeout_s` passed first (the caller
        fetches anyway: a replica that died holding it releases it, and a stuck one must not become
        an outage)."""
        folder = self.root / RESOLVING
        folder.mkdir(exist_ok=True)
        _refuse_link(folder)
        fd = os.open(folder / check_name(name), os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = True
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        held = False
                        break
                    time.sleep(0.05)
            yield held
        finally:
            os.close(fd)

    # Writing: staging -> .versions/<name>/<version> -> pointer.
    def _publish(self, name: str, version: str, staging: Path) -> Path:
        parent, target = self._versions / name, self._versions / name / version
        for _ in range(3):  # a concurrent delete or sweep may remove the empty parent meanwhile
            parent.mkdir(exist_ok=True)
            try:
                staging.rename(target)
                break
            except FileNotFoundError:
                continue
        else:
            raise FileNotFoundError(f"cannot publish {staging} to {target}")
        _fsync_dir(parent)
        _fsync_dir(self._versions)
        return target

    def _point(self, name: str, version: str, replace: bool) -> None:
        link, target = self.root / name, f"{VERSIONS}/{name}/{version}"
        if not replace:
            try:
                os.symlink(target, link)
            except FileExistsError:
                raise AdapterExistsError(f"adapter {name!r} already exists; send replace=true to overwrite") from None
        else:
            previous = self.version(name)
            temporary = self.root / f".link-{version}"
            os.symlink(target, temporary)
            os.replace(temporary, link)
            if previous is not None:
                _touch(self._versions / name / previous)  # its grace period starts now
        _fsync_dir(self.root)

    @contextmanager
    def _upload_lock(self, version: str) -> Iterator[None]:
        """Held for the whole upload; created before the staging directory and removed after it."""
        lock_path = self._lock_path(version)
        fd = os.open(lock_path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            lock_path.unlink(missing_ok=True)  # before unlocking, so no sweep can take the lock of a finished upload
            os.close(fd)

    def _lock_path(self, version: str) -> Path:
        return self.root / f"{STAGING}{version}{LOCK}"

    # Cleaning up.
    def collect(self, name: str, grace_s: float) -> None:
        """`_collect` with a grace of its own: the byte budget gives the versions it evicted a short one."""
        self._collect(name, grace_s)

    def _collect(self, name: str, grace_s: float | None = None) -> None:
        """Remove versions of `name` that are not current, past their grace period and not being written."""
        current = self.version(name) if is_valid_name(name) else None
        try:
            versions = [p for p in (self._versions / name).iterdir() if p.name != current]
        except FileNotFoundError:
            return
        for path in versions:
            self._remove_if_dead(path.name, path, grace_s=grace_s)
        if current is None:
            try:
                (self._versions / name).rmdir()
            except OSError:  # not empty (a version in its grace period, or a save landing), or gone
                pass

    def _remove_if_dead(self, version: str, *paths: Path, grace_s: float | None = None) -> None:
        ages = [_age(path) for path in paths]
        if min(ages) < (self.grace_s if grace_s is None else grace_s):
            return
        with _try_lock(self._lock_path(version)) as taken:
            if taken:
                for path in paths:
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)

    def _migrate_unversioned(self) -> None:
        """Stores written before versioning hold <root>/<name> as a directory: put each behind a pointer."""
        with os.scandir(self.root) as entries:
            legacy = [e.name for e in entries if is_valid_name(e.name) and e.is_dir(follow_symlinks=False)]
        for name in legacy:
            version = _new_version()
            (self._versions / name).mkdir(exist_ok=True)
            try:
                os.rename(self.root / name, self._versions / name / version)
                os.symlink(f"{VERSIONS}/{name}/{version}", self.root / name)
            except (FileNotFoundError, FileExistsError):  # another replica is migrating it
                continue
        _fsync_dir(self.root)


def _read_composition(path: Path) -> tuple[tuple[str, float], ...]:
    """[{"name": adapter, "scale": s}, ...] with valid names and finite scales, or ValueError."""
    if path.is_symlink():
        raise ValueError("a link, which could lead out of the store")
    terms = json.loads(path.read_bytes())
    if not isinstance(terms, list) or not terms:
        raise ValueError("expected a non-empty list of {name, scale}")
    parsed = []
    for term in terms:
        name, scale = term["name"], term["scale"]
        if not isinstance(name, str) or not is_valid_name(name):
            raise ValueError(f"invalid adapter name {name!r}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale of {name!r} must be a finite number, not {scale!r}")
        parsed.append((name, float(scale)))
    return tuple(parsed)


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise InvalidAdapterError(
            f"{path} is a link; the store's own folders must be real directories", field="adapter_store"
        )


def _new_version() -> str:
    """Unique per save, across processes and replicas; sorts by creation time."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex}"


@contextmanager
def _try_lock(lock_path: Path) -> Iterator[bool]:
    """True (and held until exit) if no live upload holds `lock_path`; True if there is no lock."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
        lock_path.unlink(missing_ok=True)  # a dead upload's lock goes with what it guarded
    finally:
        os.close(fd)


def _age(path: Path) -> float:
    """Seconds since `path` was last changed; infinite if it is gone (nothing there to protect)."""
    try:
        return time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return float("inf")


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
