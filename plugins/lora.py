"""``lora``: low-rank adaptation (Hu et al. 2021) with optional rank-stabilised scaling (rsLoRA).

For a frozen base ``y = W0 x + b`` (``W0``: ``out x in``) the adapter adds a rank-``r`` update

    y = W0 x + b + s * B A dropout(x),   A: r x in,  B: out x r,
    s = alpha / r            (LoRA)
    s = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023)

so the merged weight is ``W0 + s B A``. Initialisation keeps ``s B A = 0`` at the start:

* linear / Conv1D: ``A`` ~ kaiming_uniform(a=sqrt(5)) (PEFT, loralib) or, with ``init="gaussian"``,
  ``A ~ N(0, std=1/r)`` (PEFT's ``"gaussian"``); ``B = 0``;
* embedding (PEFT's ``lora_embedding_A``/``lora_embedding_B``): ``A = 0`` (``r x num_embeddings``),
  ``B ~ N(0, 1)`` (``dim x r``); ``y = W0[ids] + s * (A^T[ids]) B^T``, looked up with the base
  layer's ``padding_idx``, ``max_norm``, ... exactly as PEFT does. Dropout does not apply to ids.

GPT-2's ``Conv1D`` stores ``W0^T`` (``in x out``); the adapter tensors are the same, only
``delta_weight`` is transposed into that layout. On a quantized base (``lora(...) on nf4``, i.e.
QLoRA) the base runs dequantized and only ``A``, ``B`` train. Adapter tensors are fp32 (fp64 for an
fp64 base) on the base weight's device; the update is cast to the base output's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.registry import (
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    QuantizedLinear,
    Variant,
    hookimpl,
    param,
)

from ._triton import kernel_mode


@dataclass(frozen=True)
class LoraParams:
    r: int = param(8, "rank of the update B A", positive=True)
    alpha: float = param(8.0, "lora_alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)",
                         positive=True)
    dropout: float = param(0.0, "dropout probability on the adapter's input (0 <= p < 1)", min=0.0)
    rslora: bool = param(False, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    init: Literal["kaiming", "gaussian"] = param(
        "kaiming", "how A starts: kaiming_uniform(a=sqrt 5) or gaussian N(0, std 1/r); B starts at 0")

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ParamError(f"dropout must be >= 0 and < 1, got {self.dropout!r}", param="dropout")
        if self.r <= 0:
            raise ParamError(f"r must be a positive int, got {self.r!r}", param="r")
        if self.alpha <= 0:
            raise ParamError(f"alpha must be a positive float, got {self.alpha!r}", param="alpha")


def lora_scaling(r: int, alpha: float, rslora: bool) -> float:
    """``alpha / sqrt(r)`` with rsLoRA, else ``alpha / r``."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def base_device_dtype(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the base layer's (possibly quantized) weight."""
    if isinstance(base, QuantizedLinear):
        held = next(iter(base.buffers()), None)
        device = held.device if held is not None else torch.device("cpu")
        return device, base.weight_dtype
    return base.weight.device, base.weight.dtype


def adapter_factory(base: nn.Module) -> dict[str, Any]:
    """Device and dtype for adapter tensors: fp32 (fp64 for an fp64 base) on the base layer's device."""
    device, base_dtype = base_device_dtype(base)
    dtype = torch.promote_types(base_dtype, torch.float32) if base_dtype.is_floating_point else torch.float32
    return {"device": device, "dtype": dtype}


def set_lora_attributes(layer: AdapterLayer, r: int, alpha: float, dropout: float, rslora: bool, init: str) -> None:
    """The hyper-parameters every LoRA-style layer exposes (``r``, ``alpha``, ``scaling``, ``rslora``,
    ``init``, ``dropout`` + its ``lora_dropout`` module), and a frozen base."""
    layer.r = int(r)
    layer.alpha = float(alpha)
    layer.rslora = bool(rslora)
    layer.init = init
    layer.dropout = float(dropout)
    layer.scaling = lora_scaling(layer.r, layer.alpha, layer.rslora)
    layer.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    layer.base_layer.requires_grad_(False)


def init_lora_A(weight: torch.Tensor, init: str, r: int) -> None:
    """``kaiming_uniform(a=sqrt 5)`` (PEFT, loralib) or, for ``gaussian``, ``N(0, std=1/r)`` (PEFT)."""
    if init == "gaussian":
        nn.init.normal_(weight, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LoraLayer(AdapterLayer):
    """A LoRA adapter around a Linear, Conv1D, Embedding or quantized Linear.

    Attributes read by the engine and the PEFT exporter: ``r``, ``alpha``, ``scaling``, ``rslora``,
    ``dropout``, ``init``; tensors ``lora_A.weight`` / ``lora_B.weight`` (linear, conv1d) or
    ``lora_embedding_A`` / ``lora_embedding_B`` (embedding).
    """

    variant = "lora"

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming"):
        super().__init__(base_layer)
        if self.kind not in Lora.kinds:
            raise ModuleTypeError(f"lora cannot wrap a {type(base_layer).__name__} (it wraps: conv1d, "
                                  f"embedding, linear)")
        set_lora_attributes(self, r, alpha, dropout, rslora, init)
        factory = adapter_factory(base_layer)
        if self.kind == "embedding":
            self.lora_embedding_A = nn.Parameter(torch.empty(self.r, self.in_features, **factory))
            self.lora_embedding_B = nn.Parameter(torch.empty(self.out_features, self.r, **factory))
        else:
            self.lora_A = nn.Linear(self.in_features, self.r, bias=False, **factory)
            self.lora_B = nn.Linear(self.r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Initialise so that ``delta_weight() == 0`` (see the module docstring)."""
        with torch.no_grad():
            if self.kind == "embedding":
                nn.init.zeros_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)
                return
            init_lora_A(self.lora_A.weight, self.init, self.r)
            nn.init.zeros_(self.lora_B.weight)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return (self.lora_embedding_A if self.kind == "embedding" else self.lora_A.weight).dtype

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + s * B A dropout(x)``, the update in the adapter's dtype; over a Linear, Conv1D or
        4-bit base, without dropout in training, one fused Triton kernel on CUDA (see :func:`kernel_mode`)."""
        if self.kind != "embedding" and not args and not kwargs and (mode := kernel_mode()) != "torch" and (
                x.is_cuda or mode == "triton"):
            from ._lora_kernel import fused_lora_linear

            fused = fused_lora_linear(self, x, forced=mode == "triton")
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        if self.kind == "embedding":
            update = self._embed(x, self.lora_embedding_A.t()) @ self.lora_embedding_B.t()
        else:
            update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.adapter_dtype))))
        if update.dtype == result.dtype:  # one pass: result + s * update
            return torch.add(result, update, alpha=self.scaling)
        return result + (update * self.scaling).to(result.dtype)

    def _embed(self, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        return F.embedding(ids, weight, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                           sparse=base.sparse)

    def delta_weight(self) -> torch.Tensor:
        """``s * B @ A`` (``out x in``) in the base module's own layout."""
        if self.kind == "embedding":
            delta = self.lora_embedding_B @ self.lora_embedding_A
        else:
            delta = self.lora_B.weight @ self.lora_A.weight
        return self.to_base_layout(delta * self.scaling)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, rslora={self.rslora}"


class Lora(Variant):
    name = "lora"
    Params = LoraParams
    kinds = frozenset({"linear", "conv1d", "embedding"})
    summary = "low-rank update W0 + (alpha/r) B A; rslora=true scales by alpha/sqrt(r)"
    paper = ("Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, 2021, arXiv 2106.09685; "
             "rsLoRA: Kalajdzievski, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA, "
             "2023, arXiv 2312.03732")
    mergeable = True

    def trainable_params(self, params: LoraParams, info: ModuleInfo) -> int:
        """``r * (in + out)`` (for an embedding ``in`` is the vocabulary size)."""
        self.check_module(info)
        return params.r * (info.in_features + info.out_features)

    def wrap(self, module: nn.Module, params: LoraParams, ctx: ApplyContext, name: str) -> LoraLayer:
        self.check_wrappable(module, name)
        return LoraLayer(module, r=params.r, alpha=params.alpha, dropout=params.dropout,
                         rslora=params.rslora, init=params.init)


@hookimpl
def register_variants(register):
    register(Lora)
