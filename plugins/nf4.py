"""``nf4``: 4-bit NormalFloat weights with blockwise absmax (QLoRA), stored by bitsandbytes.

Each block of ``blocksize`` weights keeps ``c = max |w|`` and 4-bit indices into the NF4 code --
16 quantiles of N(0, 1) scaled to [-1, 1] with an exact zero -- so ``w ~= NF4[idx] * c``.
With ``double_quant`` the scales ``c`` are themselves quantized to 8 bits in blocks of 256:
``4 + 8/64 + 32/(64*256) ~= 4.127`` bits per weight at blocksize 64 (4.5 without).
``lora(...) on nf4`` is QLoRA: the adapter trains in full precision on top of the frozen 4-bit base.
"""

from __future__ import annotations

from adapterhub.plugins._bnb import Bnb4bitLinear, FourBitQuantizer
from adapterhub.registry import hookimpl


class Nf4Linear(Bnb4bitLinear):
    """A frozen Linear whose weight is NF4 codes plus (double-quantized) block scales."""

    quantizer = "nf4"
    quant_type = "nf4"


class Nf4Quantizer(FourBitQuantizer):
    name = "nf4"
    Linear = Nf4Linear
    summary = "4-bit NormalFloat base weights with blockwise absmax and optional double quantization"
    paper = "Dettmers et al., QLoRA: Efficient Finetuning of Quantized LLMs, 2023, arXiv 2305.14314"


@hookimpl
def register_quantizers(register):
    register(Nf4Quantizer)
