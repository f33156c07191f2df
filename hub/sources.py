"""Where a bundle comes from: a directory, a stored version, or a Hugging Face Hub repository.

``bundle_dir(source)`` turns what a user writes into a directory holding the bundle's files:

* an existing directory → itself;
* ``hf://org/repo`` or ``hf://org/repo@REV`` (a tag such as ``v2``, a branch or a commit) →
  :func:`adapterhub.remote.fetch` downloads it into a cache directory;
* ``name``, ``name@v3``, ``name@tag``, ``name@sha256:...`` → the version in the local store,
  :meth:`adapterhub.store.Store.checkout`.

The store and remote modules are imported only when needed, so loading a directory needs neither.
"""

from __future__ import annotations

import os
from pathlib import Path

from adapterhub.registry import AdapterhubError

HF_SCHEME = "hf://"


def parse_hf(source: str) -> tuple[str, str | None]:
    """``hf://org/repo@rev`` → ``("org/repo", "rev")`` (``rev`` None when absent)."""
    rest = source[len(HF_SCHEME):]
    repo, _, rev = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise AdapterhubError(f"'{source}' is not a Hub reference: write hf://org/name or hf://org/name@v2")
    return repo, rev or None


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or os.sep in source or (os.altsep or "/") in source


def bundle_dir(source: str | os.PathLike) -> Path:
    """The directory holding the bundle named by ``source`` (see the module docstring)."""
    if isinstance(source, os.PathLike):
        path = Path(source)
        if path.is_dir():
            return path
        raise AdapterhubError(f"bundle directory '{path}' does not exist"
                              if not path.exists() else f"'{path}' is a file, not a bundle directory")
    text = str(source)
    if text.startswith(HF_SCHEME):
        repo, rev = parse_hf(text)
        try:
            from adapterhub.remote import fetch
        except ImportError as exc:
            raise AdapterhubError(f"cannot fetch '{text}': the Hub support (adapterhub.remote) is not available "
                                  f"({exc})") from None
        return Path(fetch(repo, rev))
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise AdapterhubError(f"'{text}' is a file, not a bundle directory")
    if _looks_like_path(text):
        raise AdapterhubError(f"bundle directory '{text}' does not exist")
    try:
        from adapterhub.store import Store
    except ImportError as exc:
        raise AdapterhubError(f"'{text}' is not a directory, and the version store (adapterhub.store) is not "
                              f"available to look it up ({exc})") from None
    try:
        return Path(Store().checkout(text))
    except AdapterhubError as exc:
        if "@" in text:
            raise
        raise AdapterhubError(f"'{text}' is neither a bundle directory nor a stored adapter: {exc}") from None
