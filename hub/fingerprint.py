"""A fingerprint of a base model's structure: which modules exist, their kinds and shapes.

Adapters and quantization do not change it (adapter layers and quantized layers are seen
through), so a bundle can check it was made for the model it is loaded into.
"""

from __future__ import annotations

import hashlib

from torch import nn

from adapterhub.registry import AdapterLayer, QuantizedLinear, module_features


def structure(model: nn.Module) -> list[str]:
    """``name:features`` lines for every leaf with weights, seeing through adapters."""
    out = []

    def walk(prefix: str, mod: nn.Module) -> None:
        if isinstance(mod, AdapterLayer):
            if mod.attached:  # sits beside its target; not part of the base model
                return
            mod = mod.base_layer
        if isinstance(mod, QuantizedLinear):
            out.append(f"{prefix}:{mod.in_features}x{mod.out_features}")
            return
        children = list(mod.named_children())
        own = [(n, tuple(p.shape)) for n, p in mod.named_parameters(recurse=False)]
        if own:
            fin, fout = module_features(mod)
            shape = f"{fin}x{fout}" if fin is not None else ",".join(f"{n}{list(s)}" for n, s in own)
            out.append(f"{prefix}:{shape}")
        for name, child in children:
            walk(f"{prefix}.{name}" if prefix else name, child)

    walk("", model)
    return out


def model_fingerprint(model: nn.Module) -> str:
    """``sha256:<hex>`` of :func:`structure`."""
    h = hashlib.sha256("\n".join(structure(model)).encode()).hexdigest()
    return f"sha256:{h}"
