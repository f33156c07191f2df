"""The embedded version store: an SQLite index plus content-addressed blobs under ``ADAPTERHUB_HOME``.

Layout (``home`` = ``$ADAPTERHUB_HOME``, else the user cache dir + ``adapterhub``)::

    index.sqlite                 versions, their files and tags (WAL mode; see store_db.py)
    blobs/sha256/ab/cdef...      file contents named by the sha256 of their bytes (read-only files)
    tmp/<pid>-<random>.tmp       blobs being written; left-overs of a killed process are harmless
    checkouts/<hex>/             a version's files materialised for loading (<hex>: version digest)

``save`` streams every file of the bundle to ``tmp/``, hashing it, fsyncs it and renames it into
``blobs/`` (an existing blob is reused); only then one ``BEGIN IMMEDIATE`` transaction allocates the
next number for the name and inserts the version, its files and its tag. A version is visible only
once that transaction commits and all its blobs exist before it does, so a crash at any moment
leaves either the whole version or no trace of it in the index (at most unreferenced blobs and
temp files, which ``fsck`` reports as notes and ``fsck(clean=True)`` removes).

Versions are immutable and their numbers are never reused (``rm medical@v3``, then ``save`` gives
``v4``); tags move; a version's digest is sha256 over the lines ``"<filename>\\t<blob digest>\\n"``
sorted by filename, so ``medical@sha256:<prefix>`` pins content. ``rm`` deletes the version row,
then collects the blobs no version references while holding the write lock; a ``save`` checks its
blobs again inside its own transaction (and rewrites one collected meanwhile), so none is lost.

References: ``name`` / ``name@latest`` (highest number), ``name@v3``, ``name@<tag>``,
``name@sha256:<hex or prefix of at least 4>``. Names and tags: ``[A-Za-z0-9][A-Za-z0-9._-]{0,99}``
(tags not ``v<digits>`` nor ``latest``). ``adapterhub.load(model, "name@v3")`` reads
:meth:`Store.checkout` (through ``adapterhub.sources``), so the bundle's base-model fingerprint is
checked exactly as for a directory.

Modules: store_refs.py (names, references, digests, default home), store_db.py (SQLite schema and
transactions, :class:`Version`), store_blobs.py (blob files, checkouts, the test checkpoints),
store_check.py (fsck), store_diff.py (``adapterhub diff``), cli_store.py (the commands).
"""

from __future__ import annotations

import json
import os
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import store_blobs as blobs
from . import store_db as db
from .store_blobs import checkpoint
from .store_db import StoreError, Version
from .store_refs import default_home, did_you_mean, parse_ref, span, validate_name, validate_tag, version_digest

__all__ = ["Store", "StoreError", "Version", "FsckReport", "default_home", "parse_ref", "validate_name",
           "validate_tag", "version_digest"]


@dataclass
class FsckReport:
    """What :meth:`Store.fsck_report` found: ``problems`` (corruption) and ``notes`` (harmless left-overs)."""

    problems: list[str]
    notes: list[str]
    versions: int
    blobs: int
    removed: int = 0


class Store:
    """The embedded store (see the module docstring). Every method opens its own SQLite connection,
    so one ``Store`` may be used from several threads and survives ``fork``."""

    def __init__(self, home: str | Path | None = None):
        self.home = Path(home).expanduser() if home is not None else default_home()
        for sub in ("blobs/sha256", "tmp", "checkouts"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        self.index = self.home / "index.sqlite"
        with self._conn() as conn:
            db.ensure_schema(conn, self.index)

    def __repr__(self) -> str:
        return f"Store({str(self.home)!r})"

    def _conn(self) -> closing:
        return closing(db.connect(self.index))

    def blob_path(self, digest: str) -> Path:
        """Where the blob ``sha256:<hex>`` lives (it may not exist)."""
        return blobs.blob_path(self.home, digest)

    # -- writing ---------------------------------------------------------------------------------

    def save(self, bundle_dir: str | Path, name: str, *, tag: str | None = None, message: str | None = None,
             parent: str | None = None) -> Version:
        """Store the bundle directory as the next version of ``name`` (``name@vK``) and return it.

        Reads base model, fingerprint, metrics and parent from the bundle's ``adapterhub.json``;
        ``parent`` overrides the manifest's. A parent that resolves in this store is recorded as
        ``name@vK``. If the content equals the latest version of ``name``, no version is added:
        that version is returned (and ``tag`` moved to it).
        """
        from .bundle import read_manifest

        validate_name(name)
        if tag is not None:
            validate_tag(tag)
        directory = Path(bundle_dir)
        if not directory.is_dir():
            raise StoreError(f"'{bundle_dir}' is not a directory (save takes a bundle directory)")
        manifest = read_manifest(directory)
        metrics = manifest.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise StoreError(f"{directory}/adapterhub.json: 'metrics' must be an object, got {type(metrics).__name__}")
        parent = self._normalise_parent(parent if parent is not None else manifest.get("parent"))
        sources = blobs.bundle_files(directory)
        checkpoint("start")
        files: dict[str, str] = {}
        sizes: dict[str, int] = {}
        for rel, path in sources:
            files[rel], sizes[rel] = blobs.put_blob(self.home, path)
        digest = version_digest(files)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        checkpoint("blobs-stored")
        with self._conn() as conn, db.write_transaction(conn):
            checkpoint("locked")
            for rel, path in sources:  # a concurrent rm may have collected a reused blob meanwhile
                if not self.blob_path(files[rel]).is_file() and blobs.put_blob(self.home, path)[0] != files[rel]:
                    raise StoreError(f"{path} changed while it was being saved; save again")
            latest = conn.execute("SELECT id, number, digest FROM versions WHERE name = ? ORDER BY number DESC "
                                  "LIMIT 1", (name,)).fetchone()
            if latest is not None and latest[2] == digest:
                vid, number = latest[0], latest[1]
            else:
                counter = conn.execute("SELECT last FROM counters WHERE name = ?", (name,)).fetchone()
                number = max(counter[0] if counter else 0, latest[1] if latest else 0) + 1
                conn.execute("INSERT INTO counters (name, last) VALUES (?, ?) "
                             "ON CONFLICT (name) DO UPDATE SET last = excluded.last", (name, number))
                vid = conn.execute(
                    f"INSERT INTO versions ({db.VERSION_COLUMNS}) VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (name, number, digest, created, manifest.get("base_model"), manifest.get("base_fingerprint"),
                     parent, sum(sizes.values()), json.dumps(metrics, sort_keys=True, default=str), message),
                ).lastrowid
                checkpoint("version-row")
                conn.executemany("INSERT INTO files (version_id, filename, blob, size) VALUES (?, ?, ?, ?)",
                                 [(vid, rel, files[rel], sizes[rel]) for rel in files])
                checkpoint("file-rows")
            if tag is not None:
                conn.execute("INSERT INTO tags (name, tag, version_id) VALUES (?, ?, ?) "
                             "ON CONFLICT (name, tag) DO UPDATE SET version_id = excluded.version_id",
                             (name, tag, vid))
            checkpoint("before-commit")
        checkpoint("committed")
        return self.resolve(f"{name}@v{number}")

    def _normalise_parent(self, parent: Any) -> str | None:
        if parent is None or parent == "":
            return None
        parent = str(parent)
        try:
            return self.resolve(parent).ref
        except StoreError:
            return parent  # not (or no longer) in this store: e.g. hf://org/repo@v2, or a path

    def tag(self, ref: str, tag: str) -> Version:
        """Point ``tag`` at the version ``ref`` names (moving it if it pointed elsewhere)."""
        validate_tag(tag)
        v = self.resolve(ref)
        with self._conn() as conn, db.write_transaction(conn):
            row = self._find_row(conn, v.name, v.number)
            conn.execute("INSERT INTO tags (name, tag, version_id) VALUES (?, ?, ?) "
                         "ON CONFLICT (name, tag) DO UPDATE SET version_id = excluded.version_id",
                         (v.name, tag, row[0]))
        return self.resolve(v.ref)

    def untag(self, name: str, tag: str) -> None:
        """Remove ``tag`` from ``name`` (the version itself stays)."""
        validate_name(name)
        validate_tag(tag)
        with self._conn() as conn, db.write_transaction(conn):
            if conn.execute("DELETE FROM tags WHERE name = ? AND tag = ?", (name, tag)).rowcount == 0:
                raise StoreError(f"{name} has no tag {tag!r}")

    def rm(self, ref: str) -> None:
        """Delete the version ``ref`` names (its tags go with it); blobs no other version uses are removed."""
        v = self.resolve(ref)
        with self._conn() as conn:
            with db.write_transaction(conn):
                vid = self._find_row(conn, v.name, v.number)[0]
                conn.execute("DELETE FROM tags WHERE version_id = ?", (vid,))
                conn.execute("DELETE FROM files WHERE version_id = ?", (vid,))
                conn.execute("DELETE FROM versions WHERE id = ?", (vid,))
            self._collect(conn, set(v.files.values()))
            still_used = conn.execute("SELECT 1 FROM versions WHERE digest = ?", (v.digest,)).fetchone()
        if not still_used:
            blobs.discard_dir(self.home / "checkouts" / v.digest.removeprefix("sha256:"))

    def _collect(self, conn, candidates: set[str]) -> int:
        """Remove those of ``candidates`` that no version references, holding the write lock."""
        removed = 0
        with db.write_transaction(conn):
            for digest in sorted(candidates):
                if conn.execute("SELECT 1 FROM files WHERE blob = ? LIMIT 1", (digest,)).fetchone() is None:
                    path = self.blob_path(digest)
                    if path.exists():
                        os.chmod(path, 0o644)  # blobs are read-only; Windows refuses to delete those
                        path.unlink()
                        removed += 1
        return removed

    # -- reading ---------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every name with at least one version, sorted."""
        with self._conn() as conn:
            return [n for (n,) in conn.execute("SELECT DISTINCT name FROM versions ORDER BY name")]

    def versions(self, name: str) -> list[Version]:
        """The versions of ``name``, oldest first."""
        validate_name(name)
        with self._conn() as conn:
            rows = conn.execute(f"SELECT {db.VERSION_COLUMNS} FROM versions WHERE name = ? ORDER BY number",
                                (name,)).fetchall()
            if not rows:
                self._unknown_name(conn, name)
            return [db.row_to_version(conn, r) for r in rows]

    def _unknown_name(self, conn, name: str) -> None:
        names = [n for (n,) in conn.execute("SELECT DISTINCT name FROM versions")]
        if not names:
            raise StoreError(f"no adapter named {name!r}: the store {self.home} is empty "
                             "(add one with `adapterhub save DIR --name NAME`)")
        raise StoreError(f"no adapter named {name!r} in the store {self.home}{did_you_mean(name, names)}")

    def _find_row(self, conn, name: str, number: int) -> tuple:
        row = conn.execute(f"SELECT {db.VERSION_COLUMNS} FROM versions WHERE name = ? AND number = ?",
                           (name, number)).fetchone()
        if row is None:
            raise StoreError(f"{name}@v{number} was removed meanwhile")
        return row

    def resolve(self, ref: str) -> Version:
        """The version ``ref`` names: ``name`` (latest), ``name@v3``, ``name@tag``, ``name@sha256:<prefix>``."""
        name, kind, value = parse_ref(ref)
        with self._conn() as conn:
            rows = conn.execute(f"SELECT {db.VERSION_COLUMNS} FROM versions WHERE name = ? ORDER BY number",
                                (name,)).fetchall()
            if not rows:
                self._unknown_name(conn, name)
            numbers = [r[2] for r in rows]
            have = f"{name} has {span(numbers)}"
            if kind == "latest":
                row = rows[-1]
            elif kind == "number":
                row = next((r for r in rows if r[2] == value), None)
                if row is None:
                    last = conn.execute("SELECT last FROM counters WHERE name = ?", (name,)).fetchone()
                    gone = "was removed" if last and value <= last[0] else "does not exist"
                    raise StoreError(f"{name}@v{value} {gone}; {have}")
            elif kind == "tag":
                tagged = conn.execute("SELECT version_id FROM tags WHERE name = ? AND tag = ?",
                                      (name, value)).fetchone()
                if tagged is None:
                    tags = [t for (t,) in conn.execute("SELECT tag FROM tags WHERE name = ? ORDER BY tag", (name,))]
                    listing = f"its tags: {', '.join(tags)}" if tags else "it has no tags"
                    raise StoreError(f"{name} has no tag {value!r} ({listing}){did_you_mean(value, tags)}")
                row = next(r for r in rows if r[0] == tagged[0])
            else:
                hits = [r for r in rows if r[3].removeprefix("sha256:").startswith(value)]
                if not hits:
                    raise StoreError(f"no version of {name} has a digest starting with sha256:{value}")
                if len({r[3] for r in hits}) > 1:
                    found = ", ".join(f"v{r[2]} ({r[3][:19]})" for r in hits)
                    raise StoreError(f"sha256:{value} is ambiguous for {name}: {found}; give more digits")
                row = hits[0]  # same content saved under several numbers: the first of them
            return db.row_to_version(conn, row)

    def read_bytes(self, ref: str | Version, filename: str) -> bytes:
        """The bytes of one file of a version, verified against its digest."""
        v = ref if isinstance(ref, Version) else self.resolve(ref)
        if filename not in v.files:
            raise StoreError(f"{v.ref} has no file {filename!r} (files: {', '.join(v.files)})")
        return blobs.read_blob(self.home, v.files[filename], v.ref)

    def checkout(self, ref: str) -> Path:
        """A directory holding exactly the files of version ``ref``, for loading.

        It is ``<home>/checkouts/<digest hex>/``, shared by every version with that content,
        materialised atomically (temp dir + rename) from verified blobs and re-verified on reuse; a
        damaged one is replaced. Treat it as read-only: it is a cache the store may rebuild.
        """
        v = self.resolve(ref)
        target = self.home / "checkouts" / v.digest.removeprefix("sha256:")
        return blobs.materialise(self.home, target, v.files, v.ref)

    # -- checking --------------------------------------------------------------------------------

    def fsck(self, clean: bool = False) -> list[str]:
        """Verify every blob's hash and every version's files; the problems found (empty: healthy).

        Nothing is repaired. ``clean=True`` removes harmless left-overs only: temp files of dead
        processes, stale checkout temp dirs and blobs no version references.
        """
        return self.fsck_report(clean=clean).problems

    def fsck_report(self, clean: bool = False) -> FsckReport:
        """Like :meth:`fsck` with the notes (left-overs) and counts too."""
        from .store_check import check

        return check(self, clean)

