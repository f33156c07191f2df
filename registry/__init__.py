"""adapterhub.registry: hookspecs, the plugin manager, and the base classes plugins build on."""

from .base import (
    KINDS,
    AdapterLayer,
    Alias,
    ApplyContext,
    MergeMethod,
    ModuleInfo,
    QuantizedLinear,
    Quantizer,
    Variant,
    module_features,
    module_kind,
)
from .errors import AdapterhubError, ModuleTypeError, NotMergeableError, ParamError, PluginError
from .hookspecs import hookimpl, hookspec
from .manager import BUILTIN_PLUGINS, Registry, get_registry, registry_with, reset_registry
from .params import ParamInfo, bind, describe, param, to_dict

__all__ = [
    "KINDS", "AdapterLayer", "Alias", "ApplyContext", "MergeMethod", "ModuleInfo", "QuantizedLinear",
    "Quantizer", "Variant", "module_features", "module_kind", "AdapterhubError", "ModuleTypeError",
    "NotMergeableError", "ParamError", "PluginError", "hookimpl", "hookspec", "BUILTIN_PLUGINS",
    "Registry", "get_registry", "registry_with", "reset_registry", "ParamInfo", "bind", "describe",
    "param", "to_dict",
]
