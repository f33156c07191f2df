"""The store's files: content-addressed blobs (temp name, fsync, rename), checkout directories,
and the checkpoints of ``save`` where the crash-safety test pauses or kills the process."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from pathlib import Path

from .atomic import fsync_dir, fsync_tree
from .store_db import StoreError
from .store_refs import HEX

CHUNK = 1 << 20
PAUSE_ENV = "ADAPTERHUB_STORE_TEST_PAUSE"  # test hook: sleep this many seconds at every checkpoint of save
KILL_ENV = "ADAPTERHUB_STORE_TEST_KILL_AT"  # test hook: SIGKILL this process at the N-th checkpoint (1-based)
_checkpoints_passed = 0


def checkpoint(label: str) -> None:
    """A point between two steps of ``save``. Without the test environment variables it only counts;
    with them the crash-safety test pauses here (``PAUSE_ENV``) or dies here (``KILL_ENV``)."""
    global _checkpoints_passed
    _checkpoints_passed += 1
    kill_at = os.environ.get(KILL_ENV)
    if kill_at and int(kill_at) == _checkpoints_passed:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    pause = os.environ.get(PAUSE_ENV)
    if pause:
        import time

        time.sleep(float(pause))


def temp_name(prefix: str = "") -> str:
    """``<prefix><pid>-<random>.tmp``: fsck tells a dead process's left-overs by the pid."""
    return f"{prefix}{os.getpid()}-{secrets.token_hex(8)}.tmp"


def blob_path(home: Path, digest: str) -> Path:
    """Where the blob ``sha256:<hex>`` lives under ``home`` (it may not exist)."""
    hexd = digest.removeprefix("sha256:") if isinstance(digest, str) else ""
    if len(hexd) != 64 or not HEX.fullmatch(hexd):
        raise StoreError(f"not a blob digest: {digest!r}")
    return home / "blobs" / "sha256" / hexd[:2] / hexd[2:]


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def put_blob(home: Path, source: Path) -> tuple[str, int]:
    """Copy ``source`` into the blob store: hash while writing a temp file, fsync, rename into
    place (an existing blob of that digest is kept); returns ``(digest, size)``."""
    tmp = home / "tmp" / temp_name()
    h, size = hashlib.sha256(), 0
    try:
        with open(source, "rb") as src, open(tmp, "xb") as dst:
            while chunk := src.read(CHUNK):
                h.update(chunk)
                dst.write(chunk)
                size += len(chunk)
            checkpoint("blob-written")
            dst.flush()
            os.fsync(dst.fileno())
        checkpoint("blob-synced")
        digest = f"sha256:{h.hexdigest()}"
        final = blob_path(home, digest)
        if final.is_file() and final.stat().st_size == size:
            tmp.unlink()
        else:  # new (or a truncated copy, which this verified one replaces)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(tmp, 0o444)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        checkpoint("blob-stored")
        return digest, size
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _damaged(ref: str, digest: str, what: str) -> StoreError:
    return StoreError(f"{ref}: blob {digest[:19]}... is {what}; run `adapterhub fsck`")


def read_blob(home: Path, digest: str, ref: str) -> bytes:
    """The blob's bytes, verified against its digest."""
    try:
        data = blob_path(home, digest).read_bytes()
    except FileNotFoundError:
        raise _damaged(ref, digest, "missing (removed meanwhile?)") from None
    if f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise _damaged(ref, digest, "corrupted")
    return data


def copy_blob(home: Path, digest: str, dest: Path, ref: str) -> None:
    """Stream the blob to the new file ``dest``, verifying its hash on the way."""
    h = hashlib.sha256()
    try:
        src = open(blob_path(home, digest), "rb")
    except FileNotFoundError:
        raise _damaged(ref, digest, "missing (removed meanwhile?)") from None
    with src, open(dest, "xb") as out:
        while chunk := src.read(CHUNK):
            h.update(chunk)
            out.write(chunk)
    if f"sha256:{h.hexdigest()}" != digest:
        raise _damaged(ref, digest, "corrupted")


def bundle_files(directory: Path) -> list[tuple[str, Path]]:
    """``(relative posix name, path)`` of every file under ``directory``, sorted."""
    out = []
    for root, dirs, names in os.walk(directory):
        dirs.sort()
        for n in sorted(names):
            path = Path(root) / n
            rel = path.relative_to(directory).as_posix()
            if not path.is_file():
                raise StoreError(f"{path}: not a regular file; a bundle holds only regular files")
            if any(ord(c) < 32 or ord(c) == 127 for c in rel):
                raise StoreError(f"{path!r}: file names with control characters cannot be stored")
            out.append((rel, path))
    return out


def matches(directory: Path, files: dict[str, str]) -> bool:
    """``directory`` holds exactly ``files`` (relative name -> blob digest), every hash verified."""
    try:
        found = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if not p.is_dir()}
        return found == set(files) and all(hash_file(directory / f) == d for f, d in files.items())
    except OSError:
        return False


def discard_dir(path: Path) -> None:
    """Rename ``path`` aside (so it vanishes at once) and delete it; a no-op if it does not exist."""
    aside = path.with_name(f".{path.name}.gone-{temp_name()}")
    try:
        os.replace(path, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def materialise(home: Path, target: Path, files: dict[str, str], ref: str) -> Path:
    """Make ``target`` hold exactly ``files`` (from verified blobs), atomically: build a temp dir,
    rename it into place; if another process got there first, use its (verified) directory."""
    if target.is_dir() and matches(target, files):
        return target
    tmp = target.parent / temp_name(f".{target.name}.")
    try:
        for filename, digest in files.items():
            dest = tmp / filename
            dest.parent.mkdir(parents=True, exist_ok=True)
            copy_blob(home, digest, dest, ref)
        fsync_tree(tmp)
        for _ in range(3):
            try:
                os.rename(tmp, target)
                fsync_dir(target.parent)
                return target
            except OSError:
                if target.is_dir() and matches(target, files):
                    shutil.rmtree(tmp, ignore_errors=True)
                    return target
                discard_dir(target)  # damaged: replace it
        raise StoreError(f"cannot materialise {ref} at {target}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
