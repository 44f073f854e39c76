"""The adapter store under concurrent writers: real processes race on one directory, as replicas on a
shared volume do. Every loop is bounded in count and time, and every child is joined with a timeout."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

import server.store as store_module
from adapters import AdapterExistsError
from server.store import AdapterStore

NAME = "racy-lora"
CONFIG, WEIGHTS = store_module.ADAPTER_FILES
JOIN_S = 60.0
spawn = multiprocessing.get_context("spawn")


def files_for(tag: int) -> dict[str, bytes]:
    """Config and weights that name the same tag, so a reader can tell a mix of two saves."""
    return {CONFIG: json.dumps({"tag": tag}).encode(), WEIGHTS: b"weights-%d" % tag}


def read_tag(directory: Path) -> tuple[int, int]:
    """(tag in the config, tag in the weights) as stored in `directory`, read in that order."""
    config_tag = json.loads((directory / CONFIG).read_bytes())["tag"]
    time.sleep(0.0005)  # widens the race on purpose: a replace landing between the two reads must not mix them
    return config_tag, int((directory / WEIGHTS).read_bytes().removeprefix(b"weights-"))


def staging_dirs(root: Path) -> set[Path]:
    return {p for p in root.glob(".staging-*") if p.is_dir()}


def join_all(processes) -> None:
    deadline = time.monotonic() + JOIN_S
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "a child process hung"


# Children (module level, so that spawn can import them).
def _create(root: str, tag: int, barrier, results) -> None:
    store = AdapterStore(Path(root))
    barrier.wait(JOIN_S)
    try:
        store.save(NAME, files_for(tag), replace=False)
        results.put(("saved", tag))
    except AdapterExistsError:
        results.put(("exists", tag))
    except BaseException as exc:
        results.put((repr(exc), tag))


def _replace_many(root: str, count: int) -> None:
    store = AdapterStore(Path(root))
    for tag in range(1, count + 1):
        store.save(NAME, files_for(tag), replace=True)


def _save_paused(root: str, name: str, started, release) -> None:
    """A live upload: stops inside its first file write until `release` is set."""
    original = store_module._write_synced

    def paused(path, data):
        started.set()
        release.wait(JOIN_S)
        original(path, data)

    store_module._write_synced = paused
    AdapterStore(Path(root)).save(name, files_for(7))


def _save_and_crash(root: str, name: str) -> None:
    """A dead upload: the process dies inside its first file write, leaving its staging behind."""
    store_module._write_synced = lambda path, data: os._exit(3)
    AdapterStore(Path(root)).save(name, files_for(8))


def test_concurrent_creates_of_one_name_have_exactly_one_winner(tmp_path):
    num_writers = 4
    barrier, results = spawn.Barrier(num_writers), spawn.Queue()
    writers = [spawn.Process(target=_create, args=(str(tmp_path), tag, barrier, results)) for tag in range(num_writers)]
    for writer in writers:
        writer.start()
    outcomes = [results.get(timeout=JOIN_S) for _ in writers]
    join_all(writers)
    winners = [tag for outcome, tag in outcomes if outcome == "saved"]
    assert len(winners) == 1, outcomes
    assert sorted(outcome for outcome, _ in outcomes) == ["exists"] * (num_writers - 1) + ["saved"], outcomes
    store = AdapterStore(tmp_path)
    assert store.names() == [NAME]
    assert read_tag(store.path(NAME)) == (winners[0], winners[0])
    assert not staging_dirs(tmp_path)


def test_a_reader_never_sees_a_gap_or_a_mix_while_another_process_replaces(tmp_path):
    num_replaces, max_reads = 60, 200_000
    store = AdapterStore(tmp_path)
    store.save(NAME, files_for(0))
    writer = spawn.Process(target=_replace_many, args=(str(tmp_path), num_replaces))
    writer.start()
    missing, mixed, seen = 0, [], set()
    deadline = time.monotonic() + JOIN_S
    for _ in range(max_reads):
        if not writer.is_alive() or time.monotonic() > deadline:
            break
        version, path = store.version(NAME), store.path(NAME)
        try:
            config_tag, weights_tag = read_tag(path)
        except FileNotFoundError:
            missing += 1
            continue
        if version is None:
            missing += 1
        if config_tag != weights_tag:
            mixed.append((config_tag, weights_tag))
        seen.add(config_tag)
    join_all([writer])
    assert writer.exitcode == 0
    assert (missing, mixed) == (0, [])
    assert len(seen) > 1, "the reader saw no replace: the test proves nothing"
    assert read_tag(store.path(NAME)) == (num_replaces, num_replaces)


def test_the_sweep_leaves_a_live_upload_alone_and_removes_a_dead_one(tmp_path):
    AdapterStore(tmp_path)
    started, release = spawn.Event(), spawn.Event()
    live = spawn.Process(target=_save_paused, args=(str(tmp_path), "live", started, release))
    dead = spawn.Process(target=_save_and_crash, args=(str(tmp_path), "dead"))
    live.start(), dead.start()
    try:
        assert started.wait(JOIN_S)
        join_all([dead])
        assert dead.exitcode == 3
        both = staging_dirs(tmp_path)
        assert len(both) == 2

        AdapterStore(tmp_path)  # a replica starting now: the dead upload might be a slow live one
        assert staging_dirs(tmp_path) == both
        an_hour_ago = time.time() - 3600
        for path in (*both, *tmp_path.glob(".staging-*.lock")):
            os.utime(path, (an_hour_ago, an_hour_ago))
        AdapterStore(tmp_path)  # old enough now; only the lock tells the live one apart
        (kept,) = staging_dirs(tmp_path)
        assert Path(f"{kept}.lock").exists()
        assert [p.name for p in tmp_path.glob(".staging-*.lock")] == [f"{kept.name}.lock"]
    finally:
        release.set()
        join_all([live])
    assert live.exitcode == 0
    store = AdapterStore(tmp_path)
    assert store.names() == ["live"]
    assert read_tag(store.path("live")) == (7, 7)
    assert not staging_dirs(tmp_path)


def test_two_saves_in_one_process_stage_and_retire_apart(tmp_path, monkeypatch):
    """Two threads of one pid replace one name while the first is paused in its clean-up: each save
    must stage (and retire what it replaced) under its own name, not one derived from the pid."""
    store, staged, errors = AdapterStore(tmp_path), set(), []
    store.save(NAME, files_for(0))
    first_paused, second_done = threading.Event(), threading.Event()
    original_write, original_rmtree = store_module._write_synced, shutil.rmtree

    def recording_write(path, data):
        staged.add(path.parent.name)
        original_write(path, data)

    def pausing_rmtree(path, *args, **kwargs):
        if threading.current_thread().name == "first" and not first_paused.is_set():
            first_paused.set()
            second_done.wait(JOIN_S)
        original_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(store_module, "_write_synced", recording_write)
    monkeypatch.setattr(shutil, "rmtree", pausing_rmtree)

    def save(tag):
        try:
            store.save(NAME, files_for(tag), replace=True)
        except BaseException as exc:
            errors.append(exc)

    first = threading.Thread(target=save, args=(1,), name="first")
    first.start()
    assert first_paused.wait(JOIN_S)
    save(2)
    second_done.set()
    first.join(JOIN_S)
    assert not first.is_alive()
    assert errors == []
    assert len(staged) == 2
    config_tag, weights_tag = read_tag(store.path(NAME))
    assert config_tag == weights_tag != 0


def test_replace_and_delete_keep_the_old_version_loadable_for_the_grace_period(tmp_path):
    store = AdapterStore(tmp_path)
    store.save(NAME, files_for(1))
    old_path, old_version = store.path(NAME), store.version(NAME)
    with pytest.raises(AdapterExistsError):
        store.save(NAME, files_for(2))
    new_path = store.save(NAME, files_for(2), replace=True)
    assert store.path(NAME) == new_path != old_path and store.version(NAME) != old_version
    assert read_tag(old_path) == (1, 1), "a replica that resolved the old version must still load it"
    store.delete(NAME)
    assert (NAME in store, store.version(NAME), store.names()) == (False, None, [])
    assert read_tag(new_path) == (2, 2), "a replica that resolved it just before the delete must still load it"
    store.delete(NAME)  # deleting what is gone is a no-op
    AdapterStore(tmp_path, grace_s=0)  # the sweep, past the grace period
    assert not new_path.exists() and not old_path.exists()


def test_the_sweep_removes_orphaned_versions_only_after_the_grace_period(tmp_path):
    store = AdapterStore(tmp_path)
    first = store.save(NAME, files_for(1))
    orphan = first.parent / "00000000000000000000-deadbeef"
    orphan.mkdir()
    second = store.save(NAME, files_for(2), replace=True)
    AdapterStore(tmp_path)
    assert first.exists() and orphan.exists(), "removed inside the grace period"
    AdapterStore(tmp_path, grace_s=0)
    assert not first.exists() and not orphan.exists()
    assert store.path(NAME) == second and read_tag(second) == (2, 2)


def test_a_store_written_before_versioning_is_migrated(tmp_path):
    (tmp_path / NAME).mkdir()
    for file_name, data in files_for(5).items():
        (tmp_path / NAME / file_name).write_bytes(data)
    store = AdapterStore(tmp_path)
    assert store.names() == [NAME] and store.version(NAME) is not None
    assert read_tag(store.path(NAME)) == (5, 5)
    store.save(NAME, files_for(6), replace=True)
    assert read_tag(store.path(NAME)) == (6, 6)


def test_an_adapter_and_a_composition_never_share_a_name(tmp_path):
    """Names are one namespace in the store too, so replicas sharing it cannot make a name mean two
    things: neither kind takes the other's name, replace or not."""
    store = AdapterStore(tmp_path / "store")
    store.save("adapter", files_for(1))
    store.save_composition("composition", (("adapter", 1.0),))
    for replace in (False, True):
        with pytest.raises(AdapterExistsError, match="adapter in the store"):
            store.save_composition("adapter", (("adapter", 1.0),), replace)
        with pytest.raises(AdapterExistsError, match="composition in the store"):
            store.save("composition", files_for(2), replace)
    assert store.names() == ["adapter"] and set(store.compositions()) == {"composition"}
