"""DoRA (Liu et al. 2024): y = W' x + b with W' = m (W0 + s B A) / ||W0 + s B A||_row, s = alpha/r.

The reference builds the paper's merged weight ``W'`` from the layer's tensors (the norm per
output row, in fp32) and applies it as one matmul -- a different computation from the layer's
``W0 x + (g - 1) W0 x + g s B A x`` split, so the comparison is independent.
"""

from __future__ import annotations

import torch

from . import VariantCase, base_bias, base_weight_out_in


def reference(layer, x):
    s = 16 / 4  # alpha=16, r=4 in every spec below
    w0 = base_weight_out_in(layer).float()
    direction = w0 + s * layer.lora_B.weight @ layer.lora_A.weight
    norm = torch.sqrt((direction * direction).sum(dim=1))  # ||.||_row, a constant (detached in training)
    weight = (layer.lora_magnitude_vector / norm)[:, None] * direction
    y = x.float() @ weight.t()
    b = base_bias(layer)
    return y + b if b is not None else y


def count(layer):
    return layer.r * (layer.in_features + layer.out_features) + layer.out_features


TRAINABLE = {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}

CASES = [
    VariantCase(
        variant="dora", id="dora",
        specs={"llama": "attn.* -> dora(r=4, alpha=16)", "gpt2": "attn.* -> dora(r=4, alpha=16)",
               "bert": "attn.* -> dora(r=4, alpha=16)"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE,
        unsupported={"llama": "model.embed_tokens -> dora(r=4)", "gpt2": "ln_f -> dora(r=4)",
                     "bert": "embeddings.word_embeddings -> dora(r=4)"}),
    # QDoRA: W0 is the dequantized nf4 weight; right after apply the outputs equal the *quantized* base.
    VariantCase(
        variant="dora", id="dora-nf4",
        specs={"llama": "mlp.* -> dora(r=4, alpha=16) on nf4"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE,
        base_spec={"llama": "mlp.* -> freeze on nf4"}),
]
