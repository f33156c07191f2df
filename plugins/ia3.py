"""``ia3``: (IA)^3, learned rescaling vectors (Liu et al. 2022, arXiv 2205.05638).

Liu et al., *Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning*, 2022. Three learned vectors rescale the keys, the values and the feed-forward hidden
activation of every block: ``softmax(Q (l_k ⊙ K)^T / sqrt(d)) (l_v ⊙ V)`` and
``W_2 (l_ff ⊙ γ(W_1 x))``. On one frozen layer ``y = W0 x + b`` (``W0``: ``out x in``) this is

    output-side (k, v projections):      y = l ⊙ (W0 x + b),   l ∈ R^out
    input-side  (``feedforward=true``):  y = W0 (l ⊙ x) + b,   l ∈ R^in

with ``l`` initialised to 1, so the adapted model equals the base exactly at init. Only ``l``
trains: ``out`` (or ``in``) parameters per layer.

Placement is chosen by the spec's patterns (``examples/ia3.surgery``); the paper's placement:

* Llama: ``attn.{k,v}_proj -> ia3`` and ``mlp.down_proj -> ia3(feedforward=true)`` (the input of
  ``down_proj`` is the FFN hidden activation ``silu(gate(x)) ⊙ up(x)``). The keys are scaled
  before RoPE, as PEFT does (the paper's T5 has no rotary embedding).
* GPT-2: ``attn.c_attn -> ia3`` and ``mlp.c_proj -> ia3(feedforward=true)``. ``c_attn`` fuses q, k
  and v, so ``l`` (3 x n_embd) also scales the queries, as PEFT does; per head the scores depend
  on ``l_q ⊙ l_k`` only, so the functions reachable are exactly those of scaling k and v alone.
* BERT: ``attention.self.{key,value} -> ia3`` and ``layer.*.output.dense -> ia3(feedforward=true)``
  (``output.dense`` reads the GELU activation of ``intermediate.dense``).

Merge is exact (no approximation): output-side ``W' = diag(l) W0`` and ``b' = l ⊙ b`` (the bias is
rescaled too); input-side ``W' = W0 diag(l)``, bias unchanged. ``delta_weight()`` is ``W' - W0`` in
the base layout and ``delta_bias()`` is ``b' - b`` (``None`` when the bias does not change).

Unmerge is **bit-exact**: it divides by ``l`` and then restores, from a sparse record taken at
merge time, every entry whose division does not give back the original bits (entries where
``l = 0``, underflow, and the ~5% of entries where ``(w·l)/l`` rounds differently). The record
(int64 index + value) lives only while merged. A quantized base (``ia3 on nf4``) merges into a
dense dequantized copy and unmerge puts the quantized module itself back.

PEFT compatibility: the tensor is PEFT's ``ia3_l`` with PEFT's layout, ``(out, 1)`` output-side and
``(1, in)`` input-side (also for GPT-2 ``Conv1D``, whose ``in``/``out`` come from its ``in x out``
weight), so bundles load into PEFT's ``IA3Model`` as is. PEFT differs in unmerge only: it divides
by ``l + 1e-8``, which is inexact (and wrong where ``l = 0``); adapterhub follows the paper's
exact weight-space form. The vector is fp32 (fp64 for an fp64 base) on the base weight's device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub.plugins.lora import adapter_factory
from adapterhub.registry import (
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    QuantizedLinear,
    Variant,
    hookimpl,
    param,
)

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


@dataclass(frozen=True)
class IA3Params:
    feedforward: bool = param(
        False, "scale the layer's input, W0 (l * x) + b (the FFN's second matrix), instead of its output "
               "l * (W0 x + b) (keys, values)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bit patterns as integers (so -0.0, NaN payloads etc. compare exactly)."""
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.dtype.is_floating_point else t


def scale_record(original: torch.Tensor, scaled: torch.Tensor,
                 scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices and values of the entries that ``unscale(scaled, scale)`` would not restore."""
    restored = unscale(scaled, scale)
    wrong = (_bits(restored) != _bits(original)).reshape(-1)
    idx = wrong.nonzero().reshape(-1)
    return idx, original.reshape(-1)[idx].clone()


def unscale(scaled: torch.Tensor, scale: torch.Tensor,
            record: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``scaled / scale`` in fp32 (at least), cast back, with ``record``'s entries put back."""
    with torch.no_grad():
        out = (scaled.to(torch.promote_types(scaled.dtype, torch.float32)) / scale).to(scaled.dtype).contiguous()
        if record is not None:
            idx, values = record
            out.view(-1)[idx] = values
    return out


def rescale(t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``t * scale`` computed in fp32 (at least) and cast back to ``t``'s dtype."""
    return (t.to(torch.promote_types(t.dtype, torch.float32)) * scale).to(t.dtype)


class IA3Layer(AdapterLayer):
    """(IA)^3 around a Linear, GPT-2 Conv1D or quantized Linear: one vector ``ia3_l``.

    ``feedforward`` selects input-side scaling; ``ia3_l`` is ``(out, 1)`` or ``(1, in)``.
    """

    variant = "ia3"
    delta_reads_base = True  # delta = W0 (diag(l) - I): it depends on W0

    def __init__(self, base_layer: nn.Module, feedforward: bool = False):
        super().__init__(base_layer)
        if self.kind not in IA3.kinds:
            raise ModuleTypeError(f"ia3 cannot wrap a {type(base_layer).__name__} (it wraps: conv1d, linear)")
        self.feedforward = bool(feedforward)
        base_layer.requires_grad_(False)
        shape = (1, self.in_features) if self.feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **adapter_factory(base_layer)))

    # -- forward ------------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(l ⊙ x)`` (feedforward) or ``l ⊙ base(x)``."""
        l = self.ia3_l.reshape(-1)
        if self.feedforward:
            return self.base_layer((x.to(l.dtype) * l).to(x.dtype), *args, **kwargs)
        y = self.base_layer(x, *args, **kwargs)
        return (y.to(l.dtype) * l).to(y.dtype)

    # -- weight space -------------------------------------------------------------------------
    def weight_scale(self) -> torch.Tensor:
        """``l`` shaped to broadcast against the base weight in its own layout."""
        l = self.ia3_l.reshape(-1)
        scales_rows = self.feedforward == (self.kind == "conv1d")  # Conv1D stores in x out
        return l.reshape(-1, 1) if scales_rows else l.reshape(1, -1)

    def _base_weight_as_stored(self) -> torch.Tensor:
        base = self.base_layer
        return base.dequantize() if isinstance(base, QuantizedLinear) else base.weight

    def original_weight(self) -> torch.Tensor:
        """``W0`` in the base layout, also while merged (read back exactly as unmerge would)."""
        if not self.merged:
            return self._base_weight_as_stored().detach()
        if "quantized_base" in self._merge_state:
            return self._merge_state["quantized_base"].dequantize()
        return unscale(self.base_layer.weight.detach(), self._merge_state["scale"], self._merge_state["weight"])

    def original_bias(self) -> torch.Tensor | None:
        """``b`` of the base, also while merged."""
        if self.merged and "quantized_base" in self._merge_state:
            bias = self._merge_state["quantized_base"].bias
            return None if bias is None else bias.detach()
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return None
        if self.merged and "bias" in self._merge_state:
            return unscale(bias.detach(), self._merge_state["bias_scale"], self._merge_state["bias"])
        return bias.detach()

    def delta_weight(self) -> torch.Tensor:
        """``W' - W0`` in the base layout: ``(diag(l) - I) W0`` or ``W0 (diag(l) - I)``."""
        w0 = self.original_weight()
        return w0.to(self.ia3_l.dtype) * (self.weight_scale() - 1)

    def delta_bias(self) -> torch.Tensor | None:
        """``b' - b = (l - 1) ⊙ b`` output-side; ``None`` input-side or without a bias."""
        b = self.original_bias()
        if self.feedforward or b is None:
            return None
        return b.to(self.ia3_l.dtype) * (self.ia3_l.reshape(-1) - 1)

    def merge(self) -> None:
        """Scale the base weight's rows/columns (and the bias, output-side) by ``l``."""
        if self.merged:
            return
        scale = self.weight_scale().detach()
        bias_scale = self.ia3_l.detach().reshape(-1)
        base = self.base_layer
        if isinstance(base, QuantizedLinear):
            deq = base.dequantize()
            dense = base.to_linear(rescale(deq, scale))
            if dense.bias is not None and not self.feedforward:
                with torch.no_grad():
                    dense.bias.copy_(rescale(dense.bias, bias_scale))
            self._merge_state["quantized_base"] = base
            self.base_layer = dense
            self.merged = True
            return
        with torch.no_grad():
            w = base.weight
            merged = rescale(w, scale)
            self._merge_state["weight"] = scale_record(w, merged, scale)
            self._merge_state["scale"] = scale
            w.copy_(merged)
            bias = getattr(base, "bias", None)
            if bias is not None and not self.feedforward:
                merged_b = rescale(bias, bias_scale)
                self._merge_state["bias"] = scale_record(bias, merged_b, bias_scale)
                self._merge_state["bias_scale"] = bias_scale
                bias.copy_(merged_b)
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge` bit-exactly (see the module docstring)."""
        if not self.merged:
            return
        if "quantized_base" in self._merge_state:
            self.base_layer = self._merge_state.pop("quantized_base")
        else:
            with torch.no_grad():
                w = self.base_layer.weight
                w.copy_(unscale(w, self._merge_state.pop("scale"), self._merge_state.pop("weight")))
                if "bias" in self._merge_state:
                    b = self.base_layer.bias
                    b.copy_(unscale(b, self._merge_state.pop("bias_scale"), self._merge_state.pop("bias")))
        self._merge_state.clear()
        self.merged = False

    def extra_repr(self) -> str:
        side = "input (feedforward)" if self.feedforward else "output"
        return f"scales={side}, features={self.ia3_l.numel()}"


class IA3(Variant):
    name = "ia3"
    Params = IA3Params
    kinds = frozenset({"linear", "conv1d"})
    summary = ("(IA)^3: learned vector l (init 1) rescales the output l*(W0x+b) or, with feedforward=true, "
               "the input W0(l*x)+b")
    paper = ("Liu et al., Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context "
             "Learning, 2022, arXiv 2205.05638")
    mergeable = True

    def trainable_params(self, params: IA3Params, info: ModuleInfo) -> int:
        """``in`` with ``feedforward=true``, else ``out``."""
        self.check_module(info)
        return info.in_features if params.feedforward else info.out_features

    def wrap(self, module: nn.Module, params: IA3Params, ctx: ApplyContext, name: str) -> IA3Layer:
        self.check_wrappable(module, name)
        return IA3Layer(module, feedforward=params.feedforward)


@hookimpl
def register_variants(register):
    register(IA3)
