"""Crash safety and concurrency of the store.

* ``save`` is killed with SIGKILL at >= 50 points: every checkpoint between two steps of ``save``
  (twice each, the process killing itself there through the ``ADAPTERHUB_STORE_TEST_KILL_AT`` hook)
  plus 30 kills from outside after random delays (the save pausing briefly at each checkpoint via
  ``ADAPTERHUB_STORE_TEST_PAUSE`` so that the delays spread over its whole run). After each kill
  the store opens, fsck finds no problem, every earlier version is intact byte for byte, and the
  killed save either left a complete version or none.
* 4 processes saving at once get unique numbers 1..N, every version valid; saves racing with
  ``rm`` of versions sharing their blobs lose nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path

import pytest

import adapterhub.bundle  # noqa: F401 - imported before forking, so the children need not import it
from adapterhub import store_blobs
from adapterhub.store import Store

from .test_store import make_bundle, sha, tree_bytes

pytestmark = pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "fork"),
                                reason="needs fork and SIGKILL")
CTX = multiprocessing.get_context("fork") if hasattr(os, "fork") else None


def _bundle(root: Path, i: int) -> Path:
    """Bundle ``i``: a unique 64 KiB weights file, a shard shared with its neighbour, the same card."""
    rng = random.Random(i)
    shard = random.Random(10_000 + i // 2).randbytes(16 << 10)
    return make_bundle(root / f"b{i}", rng.randbytes(64 << 10), metrics={"step": i}, extra={"shard.bin": shard})


def _save_child(home: Path, bundle: Path, name: str, kill_at: int | None, pause: float | None) -> None:
    if kill_at is not None:
        os.environ[store_blobs.KILL_ENV] = str(kill_at)
    if pause is not None:
        os.environ[store_blobs.PAUSE_ENV] = str(pause)
    store_blobs._checkpoints_passed = 0
    Store(home).save(bundle, name)


def _checkpoints_per_save(tmp_path: Path) -> int:
    store = Store(tmp_path / "count")
    before = store_blobs._checkpoints_passed
    store.save(_bundle(tmp_path / "count-bundle", 0), "count")
    return store_blobs._checkpoints_passed - before


def test_kill_9_during_save_never_corrupts_the_store(tmp_path):
    home, root = tmp_path / "home", tmp_path / "bundles"
    store = Store(home)
    committed: dict[str, dict[str, bytes]] = {}
    for i in range(3):  # earlier versions that must survive every crash
        bundle = _bundle(root, i)
        committed[store.save(bundle, "crash").ref] = tree_bytes(bundle)
    points = _checkpoints_per_save(tmp_path)
    assert points >= 15  # start, 3 per file x 4 files, blobs-stored, locked, rows, commit, ...

    t0 = time.monotonic()  # how long a paused save takes here, to spread the outside kills over it
    probe = CTX.Process(target=_save_child, args=(tmp_path / "probe", _bundle(root, 999), "p", None, 0.002))
    probe.start()
    probe.join()
    span = time.monotonic() - t0

    rng = random.Random(1234)
    plan = [("self", k, None) for k in list(range(1, points + 1)) * 2]
    plan += [("outside", None, rng.uniform(0, 1.2 * span)) for _ in range(30)]
    rng.shuffle(plan)
    killed = 0
    for i, (kind, kill_at, delay) in enumerate(plan, start=3):
        bundle = _bundle(root, i)
        pause = None if delay is None else 0.002
        child = CTX.Process(target=_save_child, args=(home, bundle, "crash", kill_at, pause))
        child.start()
        if delay is not None:
            time.sleep(delay)
            os.kill(child.pid, signal.SIGKILL)
        child.join()
        if kind == "self":
            assert child.exitcode == -signal.SIGKILL
        killed += child.exitcode == -signal.SIGKILL

        store = Store(home)  # opens after the crash
        assert store.fsck() == [], f"after a kill at {kind} {kill_at or delay}"
        listed = {v.ref: v for v in store.versions("crash")}
        assert set(committed) <= set(listed), "an earlier version was lost"
        new = set(listed) - set(committed)
        assert len(new) <= 1
        for ref in new:  # the killed save got as far as its commit: the whole version is there
            files = tree_bytes(bundle)
            assert listed[ref].files == {n: sha(d) for n, d in files.items()}
            committed[ref] = files
        for ref, files in committed.items():
            assert tree_bytes(store.checkout(ref)) == files
        assert sorted(v.number for v in listed.values()) == list(range(1, len(listed) + 1))
    assert killed >= 50
    assert 3 < len(committed) < len(plan) + 3  # some kills came after the commit, most before
    report = store.fsck_report(clean=True)
    assert report.problems == [] and store.fsck_report().notes == []
    for ref, files in committed.items():
        assert tree_bytes(store.checkout(ref)) == files


def _saver(home: Path, bundles: list[Path], name: str, barrier) -> None:
    barrier.wait()
    store = Store(home)
    for b in bundles:
        store.save(b, name)


def test_concurrent_saves_get_unique_numbers(tmp_path):
    home, root = tmp_path / "home", tmp_path / "bundles"  # the store does not exist yet: all 4 create it
    per_process = 4
    bundles = [[_bundle(root, 100 * p + j) for j in range(per_process)] for p in range(4)]
    barrier = CTX.Barrier(4)
    procs = [CTX.Process(target=_saver, args=(home, bs, "shared", barrier)) for bs in bundles]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    store = Store(home)
    versions = store.versions("shared")
    assert [v.number for v in versions] == list(range(1, 4 * per_process + 1))
    expected = {tuple(sorted((n, sha(d)) for n, d in tree_bytes(b).items())): b for bs in bundles for b in bs}
    seen = {tuple(sorted(v.files.items())) for v in versions}
    assert seen == set(expected)  # every save is there, once
    for v in versions:
        assert tree_bytes(store.checkout(v.ref)) == tree_bytes(expected[tuple(sorted(v.files.items()))])
    assert store.fsck() == []
    for p in range(4):  # each process's own saves kept their order
        numbers = [next(v.number for v in versions if v.files["adapter_model.safetensors"] ==
                        sha((b / "adapter_model.safetensors").read_bytes())) for b in bundles[p]]
        assert numbers == sorted(numbers)


def _keeper(home: Path, bundles: list[Path], barrier) -> None:
    barrier.wait()
    store = Store(home)
    for b in bundles:
        store.save(b, "keep")


def _churner(home: Path, bundles: list[Path], barrier) -> None:
    barrier.wait()
    store = Store(home)
    for b in bundles:
        store.rm(store.save(b, "churn").ref)


def test_rm_racing_with_saves_of_shared_blobs_loses_nothing(tmp_path):
    home, root = tmp_path / "home", tmp_path / "bundles"
    Store(home)
    shared = [random.Random(j).randbytes(32 << 10) for j in range(12)]
    keep = [make_bundle(root / f"k{j}", f"keep {j}".encode(), extra={"shared.bin": shared[j]}) for j in range(12)]
    churn = [make_bundle(root / f"c{j}", f"churn {j}".encode(), extra={"shared.bin": shared[j]}) for j in range(12)]
    barrier = CTX.Barrier(3)
    procs = [CTX.Process(target=_keeper, args=(home, keep, barrier)),
             CTX.Process(target=_churner, args=(home, churn[:6], barrier)),
             CTX.Process(target=_churner, args=(home, churn[6:], barrier))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = Store(home)
    assert store.fsck() == []
    assert store.names() == ["keep"]
    for v in store.versions("keep"):
        assert tree_bytes(store.checkout(v.ref)) == tree_bytes(keep[v.number - 1])
