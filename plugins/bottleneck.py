"""``bottleneck``: the bottleneck adapter of Houlsby et al. 2019 and Pfeiffer et al. 2020.

Houlsby et al., *Parameter-Efficient Transfer Learning for NLP*, 2019, arXiv 1902.00751;
Pfeiffer et al., *AdapterFusion: Non-Destructive Task Composition for Transfer Learning*, 2020,
arXiv 2005.00247. A small residual MLP is inserted after a frozen module ``h = module(x)``
(``h ∈ R^d``, ``d`` = the module's ``out_features``):

    y = h + W_up f(W_down h + b_down) + b_up
    W_down: m x d,  b_down: m,  W_up: d x m,  b_up: d,   m = bottleneck size

Only these four tensors train (``down.weight``, ``down.bias``, ``up.weight``, ``up.bias``):
``2 m d + m + d`` parameters per adapter.

Parameters: ``size`` = m (default 64, the Houlsby code's default) or ``reduction_factor`` r with
``m = d // r`` (AdapterHub's way; give one, not both); ``act`` = f: ``relu`` (default; the
AdapterFusion paper's ``U(ReLU(D h)) + r``), ``gelu`` (erf), ``gelu_tanh`` (the tanh approximation
the Houlsby reference code ``adapter-bert`` uses), ``silu`` (swish, AdapterHub's Houlsby config),
``tanh``; ``init`` and ``init_std`` σ (default 1e-2, the paper's):

* ``init="zero_up"`` (default): ``W_down`` ~ N(0, σ²) truncated at ±2σ, ``W_up = 0``, biases 0. The
  adapter is then exactly the identity, so the adapted model equals the base at init (like
  LoRA's B = 0); ``W_up`` still gets a gradient at the first step since ``W_down`` is not zero.
* ``init="houlsby"``: the paper's near-identity init: *both* weights ~ N(0, σ²) truncated at ±2σ,
  biases 0, so the output is close to, not equal to, the base at init.

Placement -- the two configurations differ only in where the adapter goes; the math of one
adapter is the same. This variant wraps a leaf Linear / GPT-2 Conv1D / quantized Linear and adds
the adapter to its output; containers (an attention module) are not targets -- put the adapter
on the projection whose output feeds the residual add:

* Houlsby (two per block: after the attention output projection and after the FFN)::

      attn.o_proj -> bottleneck(size=64)          # Llama  (GPT-2: attn.c_proj; BERT: attention.output.dense)
      mlp.down_proj -> bottleneck(size=64)        # Llama  (GPT-2: mlp.c_proj;  BERT: layer.*.output.dense)

  Houlsby et al. also train the layer norms: add e.g. ``layer.*.**.LayerNorm -> train`` (BERT).
* Pfeiffer (one per block, after the FFN only)::

      mlp.down_proj -> bottleneck(reduction_factor=16)

In BERT the adapter sits after ``dense`` and hence before its dropout (the paper puts it after
the dropout); both are the identity at inference.

Not mergeable: ``f`` is non-linear, so the adapter has no weight-space form; ``merge()`` raises
:class:`NotMergeableError`. The adapter tensors are fp32 (fp64 for an fp64 base) on the base
weight's device; the adapter runs in that dtype and its output is cast to ``h``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.plugins.lora import adapter_factory
from adapterhub.registry import (
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    NotMergeableError,
    ParamError,
    Variant,
    hookimpl,
    module_features,
    param,
)

DEFAULT_SIZE = 64

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
}


@dataclass(frozen=True)
class BottleneckParams:
    # ranges are checked in __post_init__ (the messages of Optional fields read better there)
    size: int | None = param(None, f"bottleneck dimension m > 0 (default {DEFAULT_SIZE}; or give reduction_factor)")
    reduction_factor: float | None = param(None, "m = out_features // reduction_factor (> 0), instead of size")
    act: Literal["relu", "gelu", "gelu_tanh", "silu", "tanh"] = param("relu", "the non-linearity f")
    init: Literal["zero_up", "houlsby"] = param(
        "zero_up", "zero_up: W_down ~ truncated N(0, init_std), W_up = 0 (output == base at init); "
                   "houlsby: both weights ~ truncated N(0, init_std) (near-identity)")
    init_std: float = param(1e-2, "std of the truncated (at 2 std) normal the weights start from", positive=True)

    def __post_init__(self) -> None:
        if self.size is not None and self.reduction_factor is not None:
            raise ParamError("give size or reduction_factor, not both (size = out_features // reduction_factor)",
                             param="reduction_factor")
        if self.size is not None and self.size <= 0:
            raise ParamError(f"size must be a positive int, got {self.size!r}", param="size")
        if self.reduction_factor is not None and not self.reduction_factor > 0:
            raise ParamError(f"reduction_factor must be a positive float, got {self.reduction_factor!r}",
                             param="reduction_factor")
        if not self.init_std > 0:
            raise ParamError(f"init_std must be positive, got {self.init_std!r}", param="init_std")


def bottleneck_size(params: BottleneckParams, out_features: int, name: str) -> int:
    """``size``, or ``out_features // reduction_factor``, or the default 64."""
    if params.size is not None:
        return params.size
    if params.reduction_factor is not None:
        m = math.floor(out_features / params.reduction_factor)
        if m < 1:
            raise ParamError(f"bottleneck on '{name}': reduction_factor={params.reduction_factor:g} leaves no "
                             f"bottleneck for its {out_features} output features (use a smaller factor or size)",
                             param="reduction_factor")
        return m
    return DEFAULT_SIZE


class BottleneckLayer(AdapterLayer):
    """``h + up(f(down(h)))`` with ``h = base_layer(x)``; tensors ``down.*``, ``up.*`` (``nn.Linear``)."""

    variant = "bottleneck"

    def __init__(self, base_layer: nn.Module, size: int = DEFAULT_SIZE, act: str = "relu",
                 init: str = "zero_up", init_std: float = 1e-2):
        super().__init__(base_layer)
        if self.kind not in Bottleneck.kinds:
            raise ModuleTypeError(f"bottleneck cannot wrap a {type(base_layer).__name__} (it wraps: conv1d, linear)")
        if act not in ACTIVATIONS:
            raise ParamError(f"act must be one of {', '.join(ACTIVATIONS)}, got {act!r}", param="act")
        self.size = int(size)
        self.act = act
        self.init = init
        self.init_std = float(init_std)
        base_layer.requires_grad_(False)
        factory = adapter_factory(base_layer)
        self.down = nn.Linear(self.out_features, self.size, **factory)
        self.up = nn.Linear(self.size, self.out_features, **factory)
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        """Truncated-normal weights (``up`` zero unless ``init="houlsby"``), zero biases."""
        sd = self.init_std
        with torch.no_grad():
            nn.init.trunc_normal_(self.down.weight, std=sd, a=-2 * sd, b=2 * sd)
            if self.init == "houlsby":
                nn.init.trunc_normal_(self.up.weight, std=sd, a=-2 * sd, b=2 * sd)
            else:
                nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``h + W_up f(W_down h + b_down) + b_up``."""
        h = self.base_layer(x, *args, **kwargs)
        update = self.up(ACTIVATIONS[self.act](self.down(h.to(self.down.weight.dtype))))
        return h + update.to(h.dtype)

    def _not_mergeable(self) -> NotMergeableError:
        return NotMergeableError(
            f"bottleneck adapters cannot be merged into the base weights: y = h + W_up {self.act}(W_down h + b_down)"
            " + b_up is non-linear in h, so there is no weight-space form; keep the adapter layer at inference")

    def delta_weight(self) -> torch.Tensor:
        raise self._not_mergeable()

    def merge(self) -> None:
        raise self._not_mergeable()

    def unmerge(self) -> None:
        """Nothing to undo: a bottleneck adapter is never merged."""

    def extra_repr(self) -> str:
        return f"features={self.out_features}, size={self.size}, act={self.act}, init={self.init}"


class Bottleneck(Variant):
    name = "bottleneck"
    Params = BottleneckParams
    kinds = frozenset({"linear", "conv1d"})
    summary = ("bottleneck adapter after a module: y = h + W_up f(W_down h + b_down) + b_up "
               "(Houlsby: after attention output and FFN; Pfeiffer: after FFN)")
    paper = ("Houlsby et al., Parameter-Efficient Transfer Learning for NLP, 2019, arXiv 1902.00751; "
             "Pfeiffer et al., AdapterFusion: Non-Destructive Task Composition for Transfer Learning, "
             "2020, arXiv 2005.00247")
    mergeable = False

    def trainable_params(self, params: BottleneckParams, info: ModuleInfo) -> int:
        """``2 m d + m + d`` with ``d`` = out_features, ``m`` = bottleneck size."""
        self.check_module(info)
        d = info.out_features
        m = bottleneck_size(params, d, info.name)
        return 2 * m * d + m + d

    def wrap(self, module: nn.Module, params: BottleneckParams, ctx: ApplyContext, name: str) -> BottleneckLayer:
        self.check_wrappable(module, name)
        _, out_features = module_features(module)
        return BottleneckLayer(module, size=bottleneck_size(params, out_features, name), act=params.act,
                               init=params.init, init_std=params.init_std)


@hookimpl
def register_variants(register):
    register(Bottleneck)
