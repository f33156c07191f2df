"""``fsck`` for the store: verify the index, every referenced blob's hash and every version.

Problems (corruption; never repaired silently): a damaged index, a missing or corrupted blob, a
version whose digest, size or file list disagrees with its files, a tag pointing nowhere. Notes
(harmless left-overs of interrupted work): blobs no version references, temp files and checkout
temp dirs of dead processes. ``clean=True`` removes the left-overs, nothing else.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .store_blobs import hash_file

if TYPE_CHECKING:
    from .store import FsckReport, Store

STALE_AFTER_S = 24 * 3600
_TEMP_NAME = re.compile(r"(?<!\d)(\d+)-[0-9a-f]+(?:\.tmp)?$")  # <pid>-<random>[.tmp] at the end of the name


def _pid_alive(pid: int) -> bool:
    if sys.platform == "win32":  # no cheap check; rely on the age
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(path: Path) -> bool:
    """A temp file/dir named ``[.<x>.]<pid>-<random>.tmp`` whose process is gone (or that is a day old)."""
    m = _TEMP_NAME.search(path.name)
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    pid = int(m.group(1)) if m else None
    return (pid is not None and pid != os.getpid() and not _pid_alive(pid)) or age > STALE_AFTER_S


def _blobs_on_disk(root: Path) -> tuple[set[str], list[str]]:
    found, strange = set(), []
    for sub in sorted(root.iterdir()) if root.is_dir() else []:
        for p in sorted(sub.iterdir()) if sub.is_dir() else [sub]:
            hexd = sub.name + p.name
            if p.is_file() and len(sub.name) == 2 and len(hexd) == 64 and all(c in "0123456789abcdef" for c in hexd):
                found.add(f"sha256:{hexd}")
            else:
                strange.append(str(p.relative_to(root.parent.parent)))
    return found, strange


def check(store: Store, clean: bool) -> FsckReport:
    """Run every check (see the module docstring)."""
    from .store import FsckReport, version_digest

    problems: list[str] = []
    notes: list[str] = []
    removed = 0
    with store._conn() as conn:
        integrity = [r[0] for r in conn.execute("PRAGMA integrity_check")]
        if integrity != ["ok"]:
            problems.append(f"index {store.index}: " + "; ".join(integrity[:5]))
        versions = conn.execute("SELECT id, name, number, digest, size FROM versions ORDER BY name, number").fetchall()
        files: dict[int, dict[str, tuple[str, int]]] = {}
        for vid, filename, blob, size in conn.execute("SELECT version_id, filename, blob, size FROM files"):
            files.setdefault(vid, {})[filename] = (blob, size)
        ids = {v[0]: v for v in versions}
        for vid in sorted(set(files) - set(ids)):
            problems.append(f"index: file rows for a version id {vid} that does not exist")
        for name, tag, vid in conn.execute("SELECT name, tag, version_id FROM tags ORDER BY name, tag"):
            if vid not in ids or ids[vid][1] != name:
                problems.append(f"tag {name}@{tag} points to no version of {name}")

        blob_state: dict[str, str | None] = {}  # digest -> None (ok) or what is wrong
        for digest in sorted({b for fs in files.values() for b, _ in fs.values()}):
            path = store.blob_path(digest)
            if not path.is_file():
                blob_state[digest] = "is missing"
            else:
                actual = hash_file(path)
                blob_state[digest] = None if actual == digest else f"is corrupted (its bytes hash to {actual[:19]}...)"
        for vid, name, number, digest, size in versions:
            ref, fs = f"{name}@v{number}", files.get(vid, {})
            if not fs:
                problems.append(f"{ref}: has no files")
                continue
            if "adapterhub.json" not in fs:
                problems.append(f"{ref}: has no adapterhub.json")
            for filename, (blob, _) in sorted(fs.items()):
                if blob_state.get(blob):
                    problems.append(f"{ref}: file {filename}: blob {blob[:19]}... {blob_state[blob]}")
            if version_digest({f: b for f, (b, _) in fs.items()}) != digest:
                problems.append(f"{ref}: its digest {digest[:19]}... does not match its file list")
            if sum(s for _, s in fs.values()) != size:
                problems.append(f"{ref}: recorded size {size} differs from its files' sizes")
            for filename, (blob, fsize) in sorted(fs.items()):
                p = store.blob_path(blob)
                if not blob_state.get(blob) and p.stat().st_size != fsize:
                    problems.append(f"{ref}: file {filename}: recorded size {fsize} != blob size {p.stat().st_size}")

        on_disk, strange = _blobs_on_disk(store.home / "blobs" / "sha256")
        orphans = on_disk - set(blob_state)
        notes += [f"unexpected file in the blob store: {s}" for s in strange]
        if orphans:
            notes.append(f"{len(orphans)} blob(s) no version references (left by an interrupted save or rm)")
            if clean:
                removed += store._collect(conn, orphans)
    leftovers = [p for p in sorted((store.home / "tmp").iterdir()) if _stale(p)]
    leftovers += [p for p in sorted((store.home / "checkouts").iterdir())
                  if p.name.startswith(".") and (p.name.endswith(".tmp") or ".gone-" in p.name) and _stale(p)]
    if leftovers:
        notes.append(f"{len(leftovers)} temp file(s)/dir(s) left by interrupted processes")
        if clean:
            for p in leftovers:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed += 1
    return FsckReport(problems=problems, notes=notes, versions=len(versions), blobs=len(on_disk), removed=removed)
