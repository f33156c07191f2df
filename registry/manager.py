"""The plugin manager: loads built-in and third-party plugins and collects what they register.

Built-ins are plain modules listed in ``BUILTIN_PLUGINS`` and go through the same hooks as
third-party packages, which are found through the entry-point group ``adapterhub``.
``ADAPTERHUB_LOAD_PLUGINS`` restricts third-party loading: unset loads all, an empty string
loads none, ``a,b`` loads only those (entry-point or distribution names).
``ADAPTERHUB_TRACE_PLUGINS=1`` prints every hook call to stderr.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .base import Alias, MergeMethod, Quantizer, Variant
from .errors import PluginError

ENTRY_POINT_GROUP = "adapterhub"

def _builtin_plugins() -> tuple[str, ...]:
    """Every public module of ``adapterhub.plugins`` (``_private`` ones are helpers), sorted."""
    import pkgutil

    import adapterhub.plugins as pkg

    return tuple(f"{pkg.__name__}.{m.name}" for m in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)
                 if not m.name.startswith("_"))


BUILTIN_PLUGINS = _builtin_plugins()


@dataclass
class Registry:
    """Everything the plugins registered, by name, with the plugin that registered each."""

    pm: pluggy.PluginManager
    variants: dict[str, Variant] = field(default_factory=dict)
    quantizers: dict[str, Quantizer] = field(default_factory=dict)
    merge_methods: dict[str, MergeMethod] = field(default_factory=dict)
    aliases: list[Alias] = field(default_factory=list)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin

    def plugin_names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]

    def owner(self, kind: str, name: str) -> str:
        return self.owners.get((kind, name), "?")

    def alias_table(self) -> dict[str, tuple[str, ...]]:
        """role -> every fragment it matches (the role itself first)."""
        table: dict[str, list[str]] = {}
        for a in self.aliases:
            names = table.setdefault(a.role, [a.role])
            names.extend(n for n in a.names if n not in names)
        return {k: tuple(v) for k, v in table.items()}


def _selected_entry_points() -> list[importlib.metadata.EntryPoint]:
    allowed = os.environ.get("ADAPTERHUB_LOAD_PLUGINS")
    eps = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if allowed is None:
        return eps
    wanted = {w.strip() for w in allowed.split(",") if w.strip()}
    return [ep for ep in eps if ep.name in wanted or (ep.dist is not None and ep.dist.name in wanted)]


def _trace(pm: pluggy.PluginManager) -> None:
    def before(hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        print(f"[adapterhub] hook {hook_name} -> {[i.plugin_name for i in hook_impls]}", file=sys.stderr)

    def after(outcome: Any, hook_name: str, hook_impls: Any, kwargs: Any) -> None:
        print(f"[adapterhub] hook {hook_name} done", file=sys.stderr)

    pm.add_hookcall_monitoring(before, after)


def make_plugin_manager(extra: Iterable[Any] = (), entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with the built-ins, the selected entry points and ``extra`` objects."""
    pm = pluggy.PluginManager("adapterhub")
    pm.add_hookspecs(hookspecs)
    for modname in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
    if entry_points:
        for ep in _selected_entry_points():
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must say which one
                raise PluginError(f"plugin '{ep.name}' ({ep.value}) failed to import: {exc}") from exc
            pm.register(plugin, name=ep.name)
    for i, obj in enumerate(extra):
        pm.register(obj, name=getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}")
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin hook not recognised: {exc}") from exc
    if os.environ.get("ADAPTERHUB_TRACE_PLUGINS"):
        _trace(pm)
    return pm


def _collect(pm: pluggy.PluginManager, hook_name: str, register_factory: Any) -> None:
    """Call each implementation of a hook separately so registrations know their plugin."""
    caller = getattr(pm.hook, hook_name)
    for impl in caller.get_hookimpls():  # registration order: built-ins first
        register = register_factory(impl.plugin_name)
        try:
            impl.function(register=register)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin '{impl.plugin_name}' failed in {hook_name}: {exc}") from exc


def build_registry(pm: pluggy.PluginManager) -> Registry:
    reg = Registry(pm=pm)

    def named(kind: str, table: dict[str, Any], base: type):
        def factory(plugin: str):
            def register(cls: Any) -> None:
                obj = cls() if isinstance(cls, type) else cls
                if not isinstance(obj, base):
                    raise PluginError(f"plugin '{plugin}' registered {cls!r} as a {kind}, "
                                      f"but it is not an adapterhub.{base.__name__}")
                name = obj.name
                if not name or not name.isidentifier():
                    raise PluginError(f"plugin '{plugin}' registered a {kind} with an invalid name {name!r}")
                if name in table:
                    raise PluginError(f"{kind} '{name}' is registered twice: by plugin "
                                      f"'{reg.owners[(kind, name)]}' and by plugin '{plugin}'")
                table[name] = obj
                reg.owners[(kind, name)] = plugin
            return register
        return factory

    _collect(pm, "register_variants", named("variant", reg.variants, Variant))
    _collect(pm, "register_quantizers", named("quantizer", reg.quantizers, Quantizer))
    _collect(pm, "register_merge_methods", named("merge method", reg.merge_methods, MergeMethod))
    clash = set(reg.variants) & set(reg.quantizers)
    if clash:
        raise PluginError(f"names used both as variant and quantizer: {sorted(clash)}")

    def alias_factory(plugin: str):
        def register(role: str, names: Iterable[str], family: str = "") -> None:
            if not role.isidentifier():
                raise PluginError(f"plugin '{plugin}' registered an alias with invalid role {role!r}")
            reg.aliases.append(Alias(role, tuple(names), family, plugin))
        return register

    _collect(pm, "register_aliases", alias_factory)
    return reg


_default: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry (loaded once; :func:`reset_registry` forgets it)."""
    global _default
    if _default is None:
        _default = build_registry(make_plugin_manager())
    return _default


def reset_registry() -> None:
    global _default
    _default = None


def registry_with(*plugins: Any, entry_points: bool = True) -> Registry:
    """A fresh registry with extra plugin objects registered (for tests and embedding)."""
    return build_registry(make_plugin_manager(plugins, entry_points=entry_points))
