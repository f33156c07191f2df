"""What ``adapterhub serve --adapters SRC`` (and ``POST /v1/adapters``) means, turned into adapters to load.

``SRC`` is one of:

* ``store`` -- every name in the local store (``--home``, else ``$ADAPTERHUB_HOME``): its latest version,
  loaded as ``name@vK`` and also addressable as ``name``, ``name@latest`` and by its tags; older versions that
  carry a tag are loaded too (``name@vJ``, also addressable by those tags);
* a store directory (one holding ``index.sqlite``): the same, for that store;
* a store reference: ``name`` (latest), ``name@v2``, ``name@prod``, ``name@sha256:...`` -- loaded as the
  version's ``name@vK`` and addressable by the reference as written too (``name`` and ``name@latest`` both for
  the latest version; loading a newer version later moves these aliases to it);
* a bundle directory (``adapterhub.json`` or ``adapter_config.json`` inside): named by the directory name;
* a directory of bundle directories: each, named by its sub-directory name;
* ``hf://org/repo[@rev]``: named as written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from adapterhub.registry import AdapterhubError

BUNDLE_MARKERS = ("adapterhub.json", "adapter_config.json")


@dataclass
class AdapterSource:
    """One adapter to load: ``source`` for :meth:`AdapterPool.add`, the ``name`` it gets, extra ``aliases``."""

    name: str
    source: str
    aliases: list[str] = field(default_factory=list)
    immutable: bool = False  # a store version: the same name always means the same content
    origin: str = ""  # for people: "store <home>", the directory, the hf:// reference


def is_bundle_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in BUNDLE_MARKERS)


def _store(home: Path | None):
    from .store import Store

    return Store(home)


def store_sources(store) -> list[AdapterSource]:
    """Every name's latest version plus its tagged older versions (see the module docstring)."""
    out = []
    for name in store.names():
        versions = store.versions(name)
        latest = versions[-1]
        for v in versions:
            if v is not latest and not v.tags:
                continue
            aliases = [f"{name}@{t}" for t in v.tags]
            if v is latest:
                aliases = [name, f"{name}@latest", *aliases]
            out.append(AdapterSource(v.ref, str(store.checkout(v.ref)), aliases, True, f"store {store.home}"))
    return out


def expand_source(spec: str, home: Path | None = None) -> list[AdapterSource]:
    """The adapters ``spec`` names (see the module docstring); AdapterhubError when it names none."""
    if spec == "store":
        store = _store(home)
        found = store_sources(store)
        if not found:
            raise AdapterhubError(f"the store {store.home} holds no adapters (add one with "
                                  "`adapterhub save DIR --name NAME`)")
        return found
    if spec.startswith("hf://"):
        return [AdapterSource(spec, spec, origin=spec)]
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "index.sqlite").is_file():
            found = store_sources(_store(path))
            if not found:
                raise AdapterhubError(f"the store {path} holds no adapters")
            return found
        if is_bundle_dir(path):
            return [AdapterSource(path.resolve().name, str(path), origin=str(path))]
        subs = sorted(p for p in path.iterdir() if is_bundle_dir(p))
        if not subs:
            raise AdapterhubError(f"'{spec}' is neither a bundle directory (no {' or '.join(BUNDLE_MARKERS)}) "
                                  "nor a directory of bundle directories nor a store")
        return [AdapterSource(p.name, str(p), origin=str(p)) for p in subs]
    if path.exists():
        raise AdapterhubError(f"'{spec}' is a file; give a bundle directory, a store reference or 'store'")
    if spec.startswith((".", "/", "~")):
        raise AdapterhubError(f"bundle directory '{spec}' does not exist")
    from .store_refs import parse_ref

    store = _store(home)
    version = store.resolve(spec)
    name, kind, _ = parse_ref(spec)
    aliases = [name, f"{name}@latest"] if kind == "latest" else [spec]  # the latest answers to both
    aliases = [a for a in aliases if a != version.ref]
    return [AdapterSource(version.ref, str(store.checkout(version.ref)), aliases, True, f"store {store.home}")]


class NameInUse(AdapterhubError):
    """A different adapter (or the base model) already has this name."""


class AdapterCatalog:
    """The names a server answers to: canonical adapter names (one per pool entry) and aliases pointing at
    them (``medical`` -> ``medical@v2``). Plain bookkeeping, not thread-safe: the server holds its lock."""

    def __init__(self, base: str):
        self.base = base
        self.loaded: dict[str, AdapterSource] = {}  # canonical name -> where it came from (+ its aliases)
        self.aliases: dict[str, str] = {}  # alias -> canonical name

    def canonical(self, model: str) -> str | None:
        """The loaded adapter ``model`` names (itself or through an alias), None if it names none."""
        name = self.aliases.get(model, model)
        return name if name in self.loaded else None

    def needs_loading(self, item: AdapterSource) -> bool:
        """False when ``item`` is a store version already loaded under its name (only aliases to add);
        NameInUse when its name belongs to something else."""
        have = self.loaded.get(item.name)
        if item.name in self.aliases or item.name == self.base or \
                (have is not None and not (item.immutable and have.source == item.source)):
            raise NameInUse(f"the name '{item.name}' is already in use; give the adapter another name")
        return have is None

    def add(self, item: AdapterSource) -> AdapterSource:
        """Record ``item`` (after the pool loaded it) and its aliases; the newest load of an alias wins
        (``medical`` moves to a newly loaded latest version); canonical names and the base are never aliases."""
        entry = self.loaded.setdefault(item.name, AdapterSource(item.name, item.source, [], item.immutable,
                                                                item.origin))
        for alias in item.aliases:
            old = self.aliases.get(alias)
            if alias in self.loaded or alias == self.base or old == item.name:
                continue
            if old is not None:
                self.loaded[old].aliases.remove(alias)
            self.aliases[alias] = item.name
            entry.aliases.append(alias)
        return entry

    def remove(self, name: str) -> AdapterSource:
        """Forget canonical ``name`` and its aliases."""
        entry = self.loaded.pop(name)
        for alias in entry.aliases:
            self.aliases.pop(alias, None)
        return entry

    def known(self) -> list[str]:
        return [self.base, *self.loaded, *self.aliases]
