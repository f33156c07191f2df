"""LoRA (Hu et al. 2021): y = W0 x + b + s B A x, s = alpha/r (rsLoRA: alpha/sqrt(r))."""

from __future__ import annotations

import math

from . import VariantCase, linear_base


def reference(layer, x):
    s = (16 / math.sqrt(4)) if layer.rslora else 16 / 4
    return linear_base(layer, x) + s * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()


def count(layer):
    return layer.r * (layer.in_features + layer.out_features)


CASES = [
    VariantCase(
        variant="lora", id="lora",
        specs={"llama": "attn.* -> lora(r=4, alpha=16)", "gpt2": "attn.* -> lora(r=4, alpha=16)",
               "bert": "attn.* -> lora(r=4, alpha=16)"},
        reference=reference, count=count, trainable=lambda layer: {"lora_A.weight", "lora_B.weight"},
        unsupported={"llama": "model.norm -> lora(r=4)", "gpt2": "ln_f -> lora(r=4)",
                     "bert": "embeddings.LayerNorm -> lora(r=4)"}),
    VariantCase(
        variant="lora", id="rslora",
        specs={"llama": "mlp.* -> lora(r=4, alpha=16, rslora=true)"},
        reference=reference, count=count, trainable=lambda layer: {"lora_A.weight", "lora_B.weight"}),
]
