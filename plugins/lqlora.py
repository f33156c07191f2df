"""``lqlora``: LoRA initialised from the low-rank plus quantized decomposition W ~= Q + L1 L2.

Guo, Greengard, Xing, Kim, *LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient
Language Model Finetuning*, 2023 (ICLR'24), arXiv 2311.12023.

**Decomposition** (``plugins/_nfk.py``): ``Q = 0``; repeat ``(L1, L2) = SVD_k(W - Q)`` (rank
``k = r``), ``Q = quant(W - L1 L2)`` until ``||W - Q - L1 L2||_F`` rises (at most ``iters`` times),
keeping the lowest-error iterate. ``quant`` is the rule's own quantizer (``on lq(...)`` -- the
paper's NF-b with per-matrix configs -- or ``nf4``, ``fp4``, ``int8``...), called on a Linear
holding ``W - L1 L2``, so the base built here is exactly what that quantizer builds at runtime.
With ``lq(fisher=...)`` the SVD and the error are Fisher-weighted (``_nfk.py``).

**Adapter** (shapes as LoRA: ``A``: ``r x in``, ``B``: ``out x r``), respecting ``s = alpha / r``::

    A = L2 / sqrt(s),   B = L1 / sqrt(s)       so   deq(Q) + s B A = Q + L1 L2 ~= W
    y = deq(Q) x + b + s B A dropout(x)

Only ``A`` and ``B`` train (``r (in + out)`` parameters); ``Q`` stays frozen. Right after apply the
model is the decomposition, not ``W`` itself: it differs from the base by ``W - Q - L1 L2``.
PEFT has no LQ-LoRA; its LoftQ init ignores ``s`` (``B A = L1 L2`` even when ``alpha != r``),
which this follows the paper in avoiding.

**Merge**: exact only into 16-bit -- ``W' = deq(Q) + s B A`` as a dense Linear (the generic
:meth:`AdapterLayer.merge` on a quantized base); ``unmerge`` restores the quantized base.
With ``on lq(budget=...)`` the quantizer's ``rank`` must equal ``r`` (the allocation estimates
the decomposition error at that rank).

A bundle saves ``Q`` itself (``base_quant.safetensors``, ``plugins/_saved_base.py``); loading one
restores it and skips the decomposition (and the Fisher file, and ``lq``'s budget allocation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub.plugins._bnb import linear_weight
from adapterhub.plugins._lq_fisher import FisherFile
from adapterhub.plugins._nfk import Decomposition, lq_decompose
from adapterhub.plugins._saved_base import will_restore
from adapterhub.plugins.lora import LoraLayer
from adapterhub.registry import (
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    QuantizedLinear,
    Quantizer,
    Variant,
    hookimpl,
    module_kind,
    param,
)


@dataclass(frozen=True)
class LqLoraParams:
    r: int = param(64, "rank k of L1 L2 (the adapter's rank)", positive=True)
    alpha: float = param(16.0, "the update is scaled by s = alpha/r; A = L2/sqrt(s), B = L1/sqrt(s)",
                         positive=True)
    dropout: float = param(0.0, "dropout probability on the adapter's input (0 <= p < 1)", min=0.0)
    iters: int = param(100, "most decomposition iterations (it stops once the error rises)", min=1)

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ParamError(f"dropout must be >= 0 and < 1, got {self.dropout!r}", param="dropout")


class LqLoraLayer(LoraLayer):
    """A LoRA layer (``lora_A``, ``lora_B``) around the quantized ``Q`` of an LQ decomposition.

    ``lq_error`` is ``||W - Q - L1 L2||_F^2`` at init (Fisher-weighted when used),
    ``lq_iterations`` how many iterations produced it (``nan`` and 0 for a base restored from a bundle).
    """

    variant = "lqlora"

    def __init__(self, base_layer: QuantizedLinear, decomposition: Decomposition, r: int, alpha: float,
                 dropout: float = 0.0):
        super().__init__(base_layer, r=r, alpha=alpha, dropout=dropout)
        root = math.sqrt(self.scaling)
        with torch.no_grad():
            self.lora_A.weight.copy_(decomposition.l2 / root)
            self.lora_B.weight.copy_(decomposition.l1 / root)
        self.lq_error = decomposition.error
        self.lq_iterations = decomposition.iterations

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lq_iterations={self.lq_iterations}, lq_error={self.lq_error:.4g}"


def _needs_quantizer(name: str) -> ParamError:
    return ParamError(f"lqlora quantizes '{name}' itself, jointly with its low-rank part: write "
                      "`-> lqlora(...) on lq(budget=...)` (or on another quantizer) on a full-precision model")


class LqLora(Variant):
    name = "lqlora"
    Params = LqLoraParams
    kinds = frozenset({"linear", "conv1d"})
    summary = "LoRA initialised from W ~= Q + L1 L2 (iterative low-rank + quantized decomposition)"
    paper = ("Guo et al., LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language "
             "Model Finetuning, 2023, arXiv 2311.12023")
    mergeable = True
    owns_quantization = True

    def trainable_params(self, params: LqLoraParams, info: ModuleInfo) -> int:
        """``r * (in + out)``; needs ``on QUANT`` and, under an ``lq`` budget, ``rank == r``."""
        self.check_module(info)
        qparams = info.extra.get("quant_params")
        if info.quantized is None or qparams is None:
            raise _needs_quantizer(info.name)
        if info.quantized == "lq" and qparams.get("budget") is not None and qparams.get("rank") != params.r:
            raise ParamError(f"lq(rank={qparams.get('rank')}) must equal lqlora's r={params.r}: the allocation "
                             f"estimates ||W - Q - L1 L2|| at that rank (write lq(..., rank={params.r}))",
                             param="rank")
        return params.r * (info.in_features + info.out_features)

    def wrap(self, module: nn.Module, params: LqLoraParams, ctx: ApplyContext, name: str) -> LqLoraLayer:
        if module_kind(module) in self.kinds:
            raise _needs_quantizer(name)
        raise ModuleTypeError(f"lqlora cannot wrap module '{name}' of type {type(module).__name__} "
                              f"(it wraps: {', '.join(sorted(self.kinds))})")

    def wrap_quantized(self, module: nn.Module, params: LqLoraParams, quantizer: Quantizer, quant_params: Any,
                       ctx: ApplyContext, name: str) -> LqLoraLayer:
        weight, bias = linear_weight(module, quantizer.name)
        out_f, in_f = weight.shape
        restore = will_restore(name)  # the loader overwrites Q with the bundle's saved base, and loads A, B
        fisher = None
        if quantizer.name == "lq" and getattr(quant_params, "fisher", "") and not restore:
            fisher = FisherFile(quant_params.fisher).get(name, (out_f, in_f)).to(weight.device)

        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32

        def quant(m: torch.Tensor) -> tuple[torch.Tensor, QuantizedLinear]:
            """The quantizer's own module for a Linear (in the model's dtype) holding ``m``."""
            lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(m)
                if bias is not None:
                    lin.bias.copy_(bias)
            q = quantizer.quantize(lin, quant_params)
            return q.dequantize().float(), q

        if restore:
            deq, q = quant(weight)
            zeros = weight.new_zeros((), dtype=torch.float32)
            dec = Decomposition(zeros.expand(out_f, params.r), zeros.expand(params.r, in_f), deq, q, math.nan, 0)
        else:
            dec = lq_decompose(weight.float(), params.r, quant, params.iters, fisher)
        return LqLoraLayer(dec.payload, dec, r=params.r, alpha=params.alpha, dropout=params.dropout)


@hookimpl
def register_variants(register):
    register(LqLora)
