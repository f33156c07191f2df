"""The store's SQLite index: schema, connections, write transactions, rows -> :class:`Version`.

The index lives in ``<home>/index.sqlite`` in WAL mode (readers never block the writer), with a
busy timeout so concurrent processes wait for the write lock instead of failing. Every write runs
in one ``BEGIN IMMEDIATE`` transaction: it takes the write lock before it reads anything, so two
processes can never both allocate the same version number. Versions and their file lists are
immutable: triggers refuse any ``UPDATE`` of them (tags, which move, are a separate table).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterhub.registry import AdapterhubError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    number INTEGER NOT NULL,
    digest TEXT NOT NULL,
    created TEXT NOT NULL,
    base_model TEXT,
    base_fingerprint TEXT,
    parent TEXT,
    size INTEGER NOT NULL,
    metrics TEXT NOT NULL,
    message TEXT,
    UNIQUE (name, number)
);
CREATE INDEX IF NOT EXISTS versions_digest ON versions (digest);
CREATE TABLE IF NOT EXISTS files (
    version_id INTEGER NOT NULL REFERENCES versions (id),
    filename TEXT NOT NULL,
    blob TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (version_id, filename)
);
CREATE INDEX IF NOT EXISTS files_blob ON files (blob);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    version_id INTEGER NOT NULL REFERENCES versions (id),
    PRIMARY KEY (name, tag)
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    last INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS versions_immutable BEFORE UPDATE ON versions
BEGIN SELECT RAISE(ABORT, 'adapterhub versions are immutable'); END;
CREATE TRIGGER IF NOT EXISTS files_immutable BEFORE UPDATE ON files
BEGIN SELECT RAISE(ABORT, 'the files of an adapterhub version are immutable'); END;
"""

VERSION_COLUMNS = "id, name, number, digest, created, base_model, base_fingerprint, parent, size, metrics, message"


class StoreError(AdapterhubError):
    """A store operation failed: unknown name/version/tag, invalid name, corrupt blob, ..."""


@dataclass(frozen=True)
class Version:
    """One immutable version of a named adapter in the store."""

    name: str
    number: int
    ref: str  # "name@v3"
    digest: str  # "sha256:<hex>" over the sorted (filename, blob digest) list
    tags: tuple[str, ...]
    created: str  # ISO 8601, UTC
    base_model: str | None
    base_fingerprint: str | None
    parent: str | None  # a ref ("name@v2") or whatever the manifest named
    size: int  # bytes, all files
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    files: dict[str, str] = field(default_factory=dict)  # filename -> "sha256:<hex>"

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "number": self.number, "ref": self.ref, "digest": self.digest,
                "tags": list(self.tags), "created": self.created, "base_model": self.base_model,
                "base_fingerprint": self.base_fingerprint, "parent": self.parent, "size": self.size,
                "metrics": self.metrics, "message": self.message, "files": dict(self.files)}


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, busy timeout, full sync."""
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, isolation_level=None)
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        deadline = time.monotonic() + BUSY_TIMEOUT_S
        while True:  # switching to WAL needs a moment of exclusive access on a fresh file
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise StoreError(f"{path}: the store needs SQLite's WAL journal (got {mode!r}); "
                             "is ADAPTERHUB_HOME on a network file system?")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"cannot open the store index {path}: {exc}") from None
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error): one atomic, serialised write."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables on first use; refuse an index written by a newer adapterhub."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StoreError(f"the store {path} was written by a newer adapterhub (schema {version}, this one "
                         f"reads {SCHEMA_VERSION}) -- upgrade adapterhub")
    try:  # every statement is idempotent, so racing first users create the same schema
        conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def row_to_version(conn: sqlite3.Connection, row: tuple) -> Version:
    """Build a :class:`Version` from a ``VERSION_COLUMNS`` row (reads its tags and files)."""
    vid, name, number, digest, created, base_model, base_fp, parent, size, metrics, message = row
    tags = tuple(t for (t,) in conn.execute("SELECT tag FROM tags WHERE version_id = ? ORDER BY tag", (vid,)))
    files = dict(conn.execute("SELECT filename, blob FROM files WHERE version_id = ? ORDER BY filename", (vid,)))
    return Version(name=name, number=number, ref=f"{name}@v{number}", digest=digest, tags=tags, created=created,
                   base_model=base_model, base_fingerprint=base_fp, parent=parent, size=size,
                   metrics=json.loads(metrics), message=message, files=files)
