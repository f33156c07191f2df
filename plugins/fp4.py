"""``fp4``: 4-bit floating-point weights (1 sign, 2 exponent, 1 mantissa bit) with blockwise absmax.

Same storage as :mod:`adapterhub.plugins.nf4` (bitsandbytes ``quantize_4bit``), but the 16 code
values are the FP4 numbers ``{0, 1/192, 1/6, 1/4, 1/3, 1/2, 2/3, 1}`` and their negatives instead of
normal quantiles: ``w ~= FP4[idx] * max|block|``. NF4 fits Gaussian weights better (QLoRA, Table 2).
"""

from __future__ import annotations

from adapterhub.plugins._bnb import Bnb4bitLinear, FourBitQuantizer
from adapterhub.registry import hookimpl


class Fp4Linear(Bnb4bitLinear):
    """A frozen Linear whose weight is FP4 codes plus (double-quantized) block scales."""

    quantizer = "fp4"
    quant_type = "fp4"


class Fp4Quantizer(FourBitQuantizer):
    name = "fp4"
    Linear = Fp4Linear
    summary = "4-bit floating-point (E2M1) base weights, blockwise absmax, optional double quantization"
    paper = ("Dettmers & Zettlemoyer, The case for 4-bit precision: k-bit Inference Scaling Laws, 2022, "
             "arXiv 2212.09720")


@hookimpl
def register_quantizers(register):
    register(Fp4Quantizer)
