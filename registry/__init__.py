"""adapterhub.registry: hookspecs, the plugin manager, and the base classes plugins build on.

Names are imported lazily: ``adapterhub.registry.params`` and ``.errors`` need no torch, so the
language (``adapterhub.dsl``) can be used without importing it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    **dict.fromkeys(["KINDS", "LEAF_KINDS", "AdapterLayer", "Alias", "ApplyContext", "MergeMethod", "ModuleInfo",
                     "QuantizedLinear", "Quantizer", "Variant", "module_features", "module_kind"], "base"),
    **dict.fromkeys(["AdapterhubError", "ModuleTypeError", "NotMergeableError", "ParamError", "PluginError"],
                    "errors"),
    **dict.fromkeys(["hookimpl", "hookspec"], "hookspecs"),
    **dict.fromkeys(["BUILTIN_PLUGINS", "Registry", "get_registry", "registry_with", "reset_registry"], "manager"),
    **dict.fromkeys(["ParamInfo", "bind", "describe", "param", "to_dict"], "params"),
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterhub.registry' has no attribute '{name}'")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
