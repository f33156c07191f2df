"""Names, version references and digests of the store (see store.py), and its default location."""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .store_db import StoreError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_NUMBER = re.compile(r"v(\d+)")
HEX = re.compile(r"[0-9a-f]+")  # lower-case hex digits
MIN_PREFIX = 4


def default_home() -> Path:
    """``$ADAPTERHUB_HOME``, else the platform's user cache directory + ``adapterhub``."""
    env = os.environ.get("ADAPTERHUB_HOME")
    if env:
        return Path(env).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "adapterhub"


def _check_identifier(value: str, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise StoreError(f"{what} must be a non-empty string, got {value!r}")
    bad = [c for c in value if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise StoreError(f"invalid {what} {value!r}: control characters are not allowed")
    if _NAME.fullmatch(value) is None:
        if len(value) > 100:
            why = "at most 100 characters"
        elif "/" in value or "\\" in value or ".." in value:
            why = "no path separators or '..'"
        elif "@" in value:
            why = "'@' separates a name from its version (name@v3)"
        else:
            why = "letters, digits, '.', '_', '-', starting with a letter or digit"
        raise StoreError(f"invalid {what} {value!r}: {why} (allowed: [A-Za-z0-9][A-Za-z0-9._-]{{0,99}})")
    return value


def validate_name(name: str) -> str:
    """An adapter name: ``[A-Za-z0-9][A-Za-z0-9._-]{0,99}`` (no path traversal, control characters, ``@``)."""
    return _check_identifier(name, "name")


def validate_tag(tag: str) -> str:
    """A tag: like a name, and neither ``v<digits>`` (version numbers) nor ``latest``."""
    _check_identifier(tag, "tag")
    if _NUMBER.fullmatch(tag) or tag == "latest":
        raise StoreError(f"invalid tag {tag!r}: 'v<number>' and 'latest' are reserved for version references")
    return tag


def parse_ref(ref: str) -> tuple[str, str, Any]:
    """``(name, kind, value)`` with kind ``latest`` (value None), ``number`` (int), ``tag`` or ``sha256``."""
    if not isinstance(ref, str):
        raise StoreError(f"a store reference is a string like 'name@v3', got {ref!r}")
    name, sep, rest = ref.partition("@")
    validate_name(name)
    if not sep or rest == "latest":
        return name, "latest", None
    if m := _NUMBER.fullmatch(rest):
        return name, "number", int(m.group(1))
    if rest.startswith("sha256:"):
        prefix = rest[len("sha256:"):].lower()
        if len(prefix) < MIN_PREFIX or not HEX.fullmatch(prefix):
            raise StoreError(f"invalid reference {ref!r}: after 'sha256:' give at least {MIN_PREFIX} hex digits")
        return name, "sha256", prefix
    try:
        return name, "tag", validate_tag(rest)
    except StoreError as exc:
        raise StoreError(f"invalid reference {ref!r} (name, name@v3, name@tag, name@sha256:<hex>): {exc}") from None


def version_digest(files: dict[str, str]) -> str:
    """sha256 over ``"<filename>\\t<blob digest>\\n"`` lines sorted by filename."""
    h = hashlib.sha256()
    for filename in sorted(files):
        h.update(f"{filename}\t{files[filename]}\n".encode())
    return f"sha256:{h.hexdigest()}"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for close matches, else ``""``."""
    close = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def span(numbers: list[int]) -> str:
    """``v1..v5``, ``only v2`` or ``v1, v3, v4``."""
    if len(numbers) == 1:
        return f"only v{numbers[0]}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"v{numbers[0]}..v{numbers[-1]}"
    return ", ".join(f"v{n}" for n in numbers)

