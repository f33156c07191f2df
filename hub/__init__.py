"""adapterhub: parameter-efficient fine-tuning from a readable ``.surgery`` spec.

    import adapterhub
    model = adapterhub.apply(model, "attn.* -> lora(r=8) on nf4")
    adapterhub.plan("path/to/checkpoint", "spec.surgery")   # no weights loaded
    adapterhub.save(model, "out/")  ;  adapterhub.load(fresh_model, "out/")

Names are imported lazily so that ``import adapterhub.dsl`` and the CLI start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "apply": "adapterhub.surgery",
    "adapter_layers": "adapterhub.surgery",
    "merge": "adapterhub.surgery",
    "unmerge": "adapterhub.surgery",
    "merge_and_unload": "adapterhub.surgery",
    "trainable_parameters": "adapterhub.surgery",
    "plan": "adapterhub.planning",
    "Plan": "adapterhub.planning",
    "PlanEntry": "adapterhub.planning",
    "save": "adapterhub.bundle",
    "load": "adapterhub.bundle",
    "Store": "adapterhub.store",
    "push": "adapterhub.remote",
    "pull": "adapterhub.remote",
    "fetch": "adapterhub.remote",
    "export_peft": "adapterhub.export",
    "stack": "adapterhub.stacking",
    "unstack": "adapterhub.stacking",
    "compose": "adapterhub.composition",
    "merge_checkpoint": "adapterhub.merge_stream",
    "train": "adapterhub.training",
    "TrainResult": "adapterhub.training",
    "load_classifier": "adapterhub.train_head",
    "AdapterPool": "adapterhub.adapter_pool",
    "GenerationEngine": "adapterhub.generation",
    "generate": "adapterhub.generation",
    "load_model": "adapterhub.models",
    "build_builtin": "adapterhub.models",
    "parse": "adapterhub.dsl",
    "parse_file": "adapterhub.dsl",
    "SurgeryError": "adapterhub.dsl",
    "AdapterhubError": "adapterhub.registry",
    "AdapterLayer": "adapterhub.registry",
    "ApplyContext": "adapterhub.registry",
    "MergeMethod": "adapterhub.registry",
    "ModuleInfo": "adapterhub.registry",
    "QuantizedLinear": "adapterhub.registry",
    "Quantizer": "adapterhub.registry",
    "Variant": "adapterhub.registry",
    "get_registry": "adapterhub.registry",
    "hookimpl": "adapterhub.registry",
    "param": "adapterhub.registry",
    "prepare_kbit_training": "adapterhub.kbit",
    "quant_memory": "adapterhub.kbit",
    "make_optimizer": "adapterhub.optim",
    "merge_quantized": "adapterhub.quant_merge",
    "MergeReport": "adapterhub.quant_merge",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adapterhub' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
