"""``qalora``: quantization-aware low-rank adaptation (Xu et al. 2023, QA-LoRA, arXiv 2309.14717).

The base is a group-wise INT-N layer (``int4``/``int3``/``int2`` of plugins/intn.py, group size
``L``): ``W~[j, i] = scale[j, l(i)] * (q[j, i] - zero[j, l(i)])``. The adapter sees the input
average-pooled over each group of ``L`` consecutive input features (the paper's ``nn.AvgPool1d(L)``)::

    xbar_l = (1/L) sum_{i in g_l} x_i                    xbar: in/L
    y = W~ x + b + s * B A dropout(xbar),   A: r x in/L,  B: out x r,  s = alpha / r

Init (the paper's code): ``A`` xavier-uniform, ``B = 0``, so the layer starts as the quantized
base. Trainable: ``lora_A.weight`` and ``lora_B.weight``: ``r * in/L + r * out`` parameters.

Merge that stays INT-N: the update is ``dW[j, i] = (s/L) (B A)[j, l(i)]``, constant within each
group, so ``W~ + dW = scale * (q - zero')`` with ``zero' = zero - (s/L) (B A) / scale`` per
(row, group). :meth:`QaLoraLayer.merge` rewrites the base's fp32 ``zeros`` in place (codes and
scales untouched, the originals kept for a bit-exact :meth:`~QaLoraLayer.unmerge`);
``adapterhub.merge_and_unload`` then leaves the INT-N layer itself in the model. Merged and
unmerged outputs agree to fp32 rounding (``scale * (dW/scale)``, ~1e-7 relative).

Where others differ: the paper's text speaks of *summing* each group; its code (``qa_pool =
AvgPool1d``) and its ``merge.py`` (``qzeros -= (B@A).T * s / group_size / scales``) use the
average, which we follow. PEFT's QALoRA (``use_qalora``) applies dropout *before* pooling,
multiplies the pooled input by ``in/L`` (so its update is ``L`` times this one for the same
``A``, ``B``), keeps PEFT's kaiming-uniform ``A`` and cannot merge.

Defaults: ``r=16``, ``alpha=16`` (the paper trains LLaMA with ``r=64``, ``alpha=16`` on GPTQ INT4,
``group=32``). The group size is the quantizer's: write ``-> qalora(...) on int4(group=32)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub.plugins.intn import INTN_QUANTIZERS, IntNLinear
from adapterhub.plugins.lora import adapter_factory
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

NEEDS_INTN = "qalora needs a group-wise intN base: write `-> qalora(...) on int4(group=32)`"


@dataclass(frozen=True)
class QaLoraParams:
    r: int = param(16, "rank of the update B A (A is r x in/group)", positive=True)
    alpha: float = param(16.0, "the update is scaled by alpha/r", positive=True)
    dropout: float = param(0.0, "dropout probability on the pooled input (0 <= p < 1)", min=0.0)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ParamError(f"dropout must be >= 0 and < 1, got {self.dropout!r}", param="dropout")


class QaLoraLayer(AdapterLayer):
    """QA-LoRA around an :class:`IntNLinear`: ``base(x) + (alpha/r) B A dropout(avgpool_L(x))``.

    Tensors ``lora_A.weight`` (``r x in/L``), ``lora_B.weight`` (``out x r``); attributes ``r``,
    ``alpha``, ``scaling``, ``dropout``, ``group`` (``L``, the base's group size).
    """

    variant = "qalora"

    def __init__(self, base_layer: nn.Module, r: int = 16, alpha: float = 16.0, dropout: float = 0.0):
        if not isinstance(base_layer, IntNLinear):
            raise ModuleTypeError(f"{NEEDS_INTN} (got a {type(base_layer).__name__})")
        super().__init__(base_layer)
        self.group = base_layer.group
        self.r = int(r)
        self.alpha = float(alpha)
        self.dropout = float(dropout)
        self.scaling = self.alpha / self.r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        base_layer.requires_grad_(False)
        factory = adapter_factory(base_layer)
        pooled = self.in_features // self.group
        self.lora_A = nn.Linear(pooled, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``A`` xavier-uniform, ``B = 0`` (QA-LoRA's ``reset_lora_parameters``)."""
        with torch.no_grad():
            nn.init.xavier_uniform_(self.lora_A.weight)
            nn.init.zeros_(self.lora_B.weight)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Average of every ``group`` consecutive input features: ``... x in`` -> ``... x in/L``."""
        return x.unflatten(-1, (self.in_features // self.group, self.group)).mean(dim=-1)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``W~ x + b + s * B A dropout(xbar)``, the update in the adapter's dtype."""
        result = self.base_layer(x, *args, **kwargs)
        xbar = self.pool(x.to(self.lora_A.weight.dtype))
        update = self.lora_B(self.lora_A(self.lora_dropout(xbar)))
        return result + (update * self.scaling).to(result.dtype)

    def group_delta(self) -> torch.Tensor:
        """``(s/L) B A`` (``out x in/L``): the update of every weight in group ``l`` of row ``j``."""
        return (self.lora_B.weight @ self.lora_A.weight) * (self.scaling / self.group)

    def delta_weight(self) -> torch.Tensor:
        """The group-constant ``dW`` (``out x in``), each group's value repeated ``L`` times."""
        return self.to_base_layout(self.group_delta().repeat_interleave(self.group, dim=1))

    def merge(self) -> None:
        """Fold the update into the base's zero-points: ``zero' = zero - (s/L) B A / scale``.

        The layer stays INT-N (same codes and scales); the original zeros are kept for unmerge.
        """
        if self.merged:
            return
        base = self.base_layer
        with torch.no_grad():
            shift = self.group_delta().detach().to(base.zeros.device).double() / base.scales.double()
            self._merge_state["zeros"] = base.zeros.clone()
            base.zeros.copy_((base.zeros.double() - shift).to(base.zeros.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Restore the base's original zero-points bit-exactly."""
        if not self.merged:
            return
        with torch.no_grad():
            self.base_layer.zeros.copy_(self._merge_state.pop("zeros"))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, group={self.group}"


class QaLora(Variant):
    name = "qalora"
    Params = QaLoraParams
    kinds = frozenset({"linear", "conv1d"})
    summary = ("LoRA on the group-average-pooled input over a group-wise INT-N base; merges into "
               "the zero-points, so the merged model stays INT-N")
    paper = ("Xu et al., QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models, 2023, "
             "arXiv 2309.14717")
    mergeable = True

    def trainable_params(self, params: QaLoraParams, info: ModuleInfo) -> int:
        """``r * in/L + r * out`` with ``L`` the intN quantizer's group."""
        self.check_module(info)
        qparams = info.extra.get("quant_params") or {}
        if info.quantized not in INTN_QUANTIZERS or "group" not in qparams:
            got = f"quantized with {info.quantized}" if info.quantized else "not quantized"
            raise ModuleTypeError(f"{NEEDS_INTN} (module '{info.name}' is {got})")
        group = int(qparams["group"])
        if info.in_features % group:
            raise ParamError(f"qalora on {info.quantized}(group={group}): the group must divide the "
                             f"in_features ({info.in_features}) of module '{info.name}'", param="group")
        return params.r * (info.in_features // group) + params.r * info.out_features

    def wrap(self, module: nn.Module, params: QaLoraParams, ctx: ApplyContext, name: str) -> QaLoraLayer:
        if not isinstance(module, IntNLinear):
            raise ModuleTypeError(f"{NEEDS_INTN} (module '{name}' is a {type(module).__name__})")
        return QaLoraLayer(module, r=params.r, alpha=params.alpha, dropout=params.dropout)


@hookimpl
def register_variants(register):
    register(QaLora)
