"""``rowscale``: learn one scale per output row of a frozen Linear.

For a base ``y = W0 x + b`` (``W0``: ``out x in``) the adapter trains ``d`` in R^out, initialised to 0:

    y = (W0 x) * (1 + d) + b        i.e.  W' = diag(1 + d) W0,  bias unchanged

so ``delta_weight = diag(d) W0`` merges exactly (``W0 + diag(d) W0 = diag(1 + d) W0``) and the
model is unchanged at init. The forward needs only the base output:
``W0 x = base(x) - b``, so ``y = base(x) + d * (base(x) - b)`` -- this also works on a
quantized base (``rowscale on nf4``). Because ``delta_weight`` reads ``W0``, the layer sets
``delta_reads_base`` so that ``merge`` caches the delta and ``unmerge`` subtracts the same one.
``out`` trainable parameters per layer. (In spirit: IA3's learned rescaling, applied to a weight's rows.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub import AdapterLayer, ApplyContext, ModuleInfo, Variant, hookimpl
from adapterhub.registry import ModuleTypeError, module_kind

__all__ = ["RowScale", "RowScaleLayer", "RowScaleParams", "register_variants"]


@dataclass(frozen=True)
class RowScaleParams:
    """``rowscale`` takes no parameters."""


class RowScaleLayer(AdapterLayer):
    """``y = base(x) + d * (base(x) - b)`` with trainable ``rowscale_d`` (``out``), zero at init."""

    variant = "rowscale"
    delta_reads_base = True

    def __init__(self, base_layer: nn.Module):
        super().__init__(base_layer)
        base_layer.requires_grad_(False)
        held = base_layer.weight if isinstance(base_layer, nn.Linear) else next(iter(base_layer.buffers()))
        d = torch.zeros(self.out_features, device=held.device, dtype=torch.float32)
        self.rowscale_d = nn.Parameter(d)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        y = self.base_layer(x, *args, **kwargs)
        bias = getattr(self.base_layer, "bias", None)
        w0x = y if bias is None else y - bias.to(y.dtype)
        return y + (w0x.to(self.rowscale_d.dtype) * self.rowscale_d).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``diag(d) W0`` (``out x in``, fp32)."""
        return self.rowscale_d.unsqueeze(1) * self.base_weight().to(self.rowscale_d.dtype)


class RowScale(Variant):
    name = "rowscale"
    Params = RowScaleParams
    kinds = frozenset({"linear"})
    summary = "learned per-output-row scale of the frozen weight: W' = diag(1 + d) W0"
    paper = "example plugin (cf. IA3: Liu et al. 2022, arXiv 2205.05638)"
    mergeable = True

    def trainable_params(self, params: RowScaleParams, info: ModuleInfo) -> int:
        self.check_module(info)
        return info.out_features

    def wrap(self, module: nn.Module, params: RowScaleParams, ctx: ApplyContext, name: str) -> RowScaleLayer:
        if module_kind(module) not in self.kinds:
            raise ModuleTypeError(f"rowscale cannot wrap module '{name}' of type {type(module).__name__} "
                                  f"(it wraps: linear)")
        return RowScaleLayer(module)


@hookimpl
def register_variants(register):
    register(RowScale)
