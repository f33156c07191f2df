"""``multilora``: n parallel LoRAs with learnable per-output scaling (MultiLoRA, Wang et al. 2023).

Wang, Lin, Zeng, Zhang, *MultiLoRA: Democratizing LoRA for Better Multi-Task Learning*, 2023,
arXiv 2311.11501.

For a frozen base ``y = W0 x + b`` (``W0``: ``out x in``)

    y = W0 x + b + (alpha / r) * sum_{i=1..n} s_i * (B_i A_i dropout(x)),
    A_i: r x in,  B_i: out x r,  s_i: out   (``*`` with s_i is element-wise over the outputs)

Tensors (per module ``i``): ``lora_A.{i}.weight``, ``lora_B.{i}.weight``, ``lora_scale.{i}``; all
trainable, ``n * (r * (in + out) + out)`` per layer.

Initialisation (the paper's changed init; no official code exists): ``s_i = 0`` and both ``A_i``
and ``B_i`` ~ kaiming_uniform(a=sqrt(5)), each drawn from the (seeded) RNG in turn, so every
module gets a different draw. ``delta_weight() = 0`` at the start, yet ``B_i != 0``: the first
backward gives ``s_i`` the gradient ``(alpha/r) g * (B_i A_i x)``, which is non-zero (``A_i``,
``B_i`` get zero gradient on that first step because it is proportional to ``s_i``; from the
first update of ``s`` on every tensor learns). LoRA's own init (``B = 0``) with ``s = 0`` would be
a dead point -- no tensor ever gets a gradient. This follows the third-party re-implementation
``pUmpKin-Co/MTL-LoRA`` (``MultiLoRALinear``); the exact distribution of ``A_i`` in the paper is
unverified (reference/variants.md section 8), kaiming-uniform is our choice. PEFT has no MultiLoRA.

Computation: the sum is one rank-``n r`` LoRA,
``A_cat = [A_1; ...; A_n]`` (``n r x in``), ``B_cat = [s_1 * B_1, ..., s_n * B_n]`` (``out x n r``),
so the forward runs two GEMMs, not ``2 n``. Merge is exact:
``W = W0 + (alpha/r) sum_i diag(s_i) B_i A_i = W0 + (alpha/r) B_cat A_cat``.
Linear, GPT-2 ``Conv1D`` (delta transposed into its layout) and quantized bases are supported;
embeddings are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.registry import (
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    Variant,
    hookimpl,
    param,
)

from .lora import adapter_factory


@dataclass(frozen=True)
class MultiLoraParams:
    n: int = param(3, "number of parallel LoRA modules", positive=True)
    r: int = param(8, "rank of each module's B_i A_i", positive=True)
    alpha: float = param(8.0, "the sum is scaled by alpha/r", positive=True)
    dropout: float = param(0.0, "dropout probability on the adapter's input (0 <= p < 1)", min=0.0)

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ParamError(f"n must be a positive int, got {self.n!r}", param="n")
        if self.r <= 0:
            raise ParamError(f"r must be a positive int, got {self.r!r}", param="r")
        if self.alpha <= 0:
            raise ParamError(f"alpha must be a positive float, got {self.alpha!r}", param="alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ParamError(f"dropout must be >= 0 and < 1, got {self.dropout!r}", param="dropout")


class MultiLoraLayer(AdapterLayer):
    """MultiLoRA around a Linear, Conv1D or quantized Linear (see the module docstring)."""

    variant = "multilora"

    def __init__(self, base_layer: nn.Module, n: int = 3, r: int = 8, alpha: float = 8.0, dropout: float = 0.0):
        super().__init__(base_layer)
        if self.kind not in MultiLora.kinds:
            raise ModuleTypeError(f"multilora cannot wrap a {type(base_layer).__name__} "
                                  f"(it wraps: {', '.join(sorted(MultiLora.kinds))})")
        self.n = int(n)
        self.r = int(r)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.scaling = self.alpha / self.r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base_layer.requires_grad_(False)
        factory = adapter_factory(base_layer)
        self.lora_A = nn.ModuleList(nn.Linear(self.in_features, self.r, bias=False, **factory)
                                    for _ in range(self.n))
        self.lora_B = nn.ModuleList(nn.Linear(self.r, self.out_features, bias=False, **factory)
                                    for _ in range(self.n))
        self.lora_scale = nn.ParameterList(nn.Parameter(torch.empty(self.out_features, **factory))
                                           for _ in range(self.n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A_i``, ``B_i`` ~ kaiming_uniform(a=sqrt 5), a fresh draw each; ``s_i = 0``."""
        with torch.no_grad():
            for a, b, s in zip(self.lora_A, self.lora_B, self.lora_scale):
                nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
                nn.init.kaiming_uniform_(b.weight, a=math.sqrt(5))
                nn.init.zeros_(s)

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.lora_A[0].weight.dtype

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_cat, B_cat)``: ``[A_1; ...; A_n]`` (``n r x in``) and ``[s_1*B_1 ... s_n*B_n]`` (``out x n r``)."""
        a_cat = torch.cat([a.weight for a in self.lora_A], dim=0)
        b_cat = torch.cat([s.unsqueeze(1) * b.weight for b, s in zip(self.lora_B, self.lora_scale)], dim=1)
        return a_cat, b_cat

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + (alpha/r) B_cat A_cat dropout(x)``, the update in the adapter's dtype."""
        result = self.base_layer(x, *args, **kwargs)
        a_cat, b_cat = self.stacked()
        update = F.linear(F.linear(self.lora_dropout(x.to(self.adapter_dtype)), a_cat), b_cat)
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha/r) sum_i diag(s_i) B_i A_i`` (``out x in``) in the base module's own layout."""
        a_cat, b_cat = self.stacked()
        return self.to_base_layout((b_cat @ a_cat) * self.scaling)

    def extra_repr(self) -> str:
        return f"n={self.n}, r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


class MultiLora(Variant):
    name = "multilora"
    Params = MultiLoraParams
    kinds = frozenset({"linear", "conv1d"})
    summary = "n parallel LoRAs with learnable output scalings: W0 + (alpha/r) sum_i diag(s_i) B_i A_i"
    paper = ("Wang et al., MultiLoRA: Democratizing LoRA for Better Multi-Task Learning, 2023, "
             "arXiv 2311.11501")
    mergeable = True

    def trainable_params(self, params: MultiLoraParams, info: ModuleInfo) -> int:
        """``n * (r * (in + out) + out)``."""
        self.check_module(info)
        return params.n * (params.r * (info.in_features + info.out_features) + info.out_features)

    def wrap(self, module: nn.Module, params: MultiLoraParams, ctx: ApplyContext, name: str) -> MultiLoraLayer:
        self.check_wrappable(module, name)
        return MultiLoraLayer(module, n=params.n, r=params.r, alpha=params.alpha, dropout=params.dropout)


@hookimpl
def register_variants(register):
    register(MultiLora)
