"""LoRA-FA (Zhang et al. 2023): y = W0 x + b + s B (A x), s = alpha/r; A frozen, only B trains."""

from __future__ import annotations

import math

from . import VariantCase, linear_base


def reference(layer, x):
    s = (16 / math.sqrt(4)) if layer.rslora else 16 / 4
    z = x @ layer.lora_A.weight.t()
    return linear_base(layer, x) + s * (z @ layer.lora_B.weight.t())


def count(layer):
    return layer.r * layer.out_features


def trainable(layer):
    return {"lora_B.weight"}


CASES = [
    VariantCase(
        variant="lora_fa", id="lora_fa",
        specs={"llama": "attn.* -> lora_fa(r=4, alpha=16)", "gpt2": "attn.* -> lora_fa(r=4, alpha=16)",
               "bert": "attn.* -> lora_fa(r=4, alpha=16)"},
        reference=reference, count=count, trainable=trainable,
        unsupported={"llama": "model.norm -> lora_fa(r=4)", "gpt2": "wte -> lora_fa(r=4)",
                     "bert": "word_embeddings -> lora_fa(r=4)"}),
    VariantCase(
        variant="lora_fa", id="lora_fa-rslora",
        specs={"llama": "mlp.* -> lora_fa(r=4, alpha=16, rslora=true)",
               "gpt2": "mlp.* -> lora_fa(r=4, alpha=16, rslora=true)"},
        reference=reference, count=count, trainable=trainable),
]
