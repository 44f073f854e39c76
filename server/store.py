"""Uploaded adapters on disk: written atomically, so a crash mid-upload leaves no broken entry.

Layout: <store>/<name>/{adapter_config.json, adapter_model.safetensors}. An upload is written to
a hidden staging directory, each file fsynced, then renamed into place; replacing swaps the
directories with one rename each. Hidden and incomplete directories are ignored (and swept).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from adapters import InvalidAdapterError
from adapters.config import CONFIG_FILE
from adapters.peft_format import WEIGHTS_FILE

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def check_name(name: str) -> str:
    """Adapter names become directory names and URL parts: no separators, no '..'."""
    if not is_valid_name(name):
        raise InvalidAdapterError("must be 1-128 characters of letters, digits, '.', '_' or '-', "
                                  "start with a letter or digit, and not contain '..'", field="name")
    return name


def is_valid_name(name: str) -> bool:
    return bool(NAME_PATTERN.match(name)) and ".." not in name


class AdapterStore:
    """A directory of adapters that survives restarts and can be shared by replicas."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(".staging-*"):  # a crash mid-upload
            shutil.rmtree(leftover, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and (p / WEIGHTS_FILE).is_file())

    def version(self, name: str) -> tuple[int, int, int] | None:
        """(inode, mtime_ns, size) of the stored weights, None if absent: changes whenever a save replaces them.

        A replace usually keeps the size (same rank and targets), and timestamps can be coarse (1 s on
        some network filesystems); every save writes a new file, so its inode tells the saves apart."""
        try:
            stat = (self.path(name) / WEIGHTS_FILE).stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def __contains__(self, name: str) -> bool:
        return (self.path(name) / WEIGHTS_FILE).is_file()

    def save(self, name: str, files: Mapping[str, bytes]) -> Path:
        """Write the files atomically under `name`, replacing what was there."""
        target = self.path(name)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.root))
        try:
            for file_name in ADAPTER_FILES:
                _write_synced(staging / file_name, files[file_name])
            if target.exists():
                retired = self.root / f".staging-old-{name}-{os.getpid()}"
                target.rename(retired)
                staging.rename(target)
                shutil.rmtree(retired, ignore_errors=True)
            else:
                staging.rename(target)
            _fsync_dir(self.root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target

    def delete(self, name: str) -> None:
        target = self.path(name)
        if target.exists():
            retired = self.root / f".staging-del-{name}-{os.getpid()}"
            target.rename(retired)  # disappears atomically; the slow delete happens after
            shutil.rmtree(retired, ignore_errors=True)
            _fsync_dir(self.root)


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
