"""``int8``: per-output-row absmax int8 weights (the weight side of LLM.int8()), via bitsandbytes.

Row ``o`` keeps ``s_o = max_i |W[o, i]|`` (fp32) and ``q[o, i] = round(127 W[o, i] / s_o)``, so
``W ~= q * s / 127`` with error at most ``s_o / 254`` per weight. Storage is
``8 + 32/in_features`` bits per weight (the row scale is shared by ``in_features`` weights).
No outlier decomposition: the activations stay in floating point, only the weight is int8.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from adapterhub.plugins._bnb import ComputeDtype, Int8Linear, compute_dtype_of, linear_weight
from adapterhub.registry import Quantizer, hookimpl, param

#: Width assumed by :meth:`Int8Quantizer.bits_per_param` when no layer width is given.
TYPICAL_IN_FEATURES = 4096


@dataclass(frozen=True)
class Int8Params:
    compute_dtype: ComputeDtype = param("auto", "dtype of the dequantized matmul (auto: the input's)")


class Int8Quantizer(Quantizer):
    name = "int8"
    Params = Int8Params
    summary = "8-bit integer base weights with one absmax scale per output row"
    paper = ("Dettmers et al., LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale, 2022, "
             "arXiv 2208.07339")

    def bits_per_param(self, params: Int8Params, in_features: int | None = None) -> float:
        """``8 + 32/in_features``; the storage depends on the layer's width, so without
        ``in_features`` a 4096-wide layer is assumed (8.0078 bits)."""
        return 8 + 32 / (in_features or TYPICAL_IN_FEATURES)

    def quantize(self, module: nn.Module, params: Int8Params) -> Int8Linear:
        weight, bias = linear_weight(module, self.name)
        return Int8Linear(weight, bias, compute_dtype=compute_dtype_of(params.compute_dtype))


@hookimpl
def register_quantizers(register):
    register(Int8Quantizer)
