"""MultiLoRA (Wang et al. 2023): y = W0 x + b + (alpha/r) sum_i s_i * (B_i A_i x), alpha = 8 in every spec."""

from __future__ import annotations

from . import VariantCase, linear_base

ALPHA = 8


def reference(layer, x):
    y = linear_base(layer, x)
    n = len(layer.lora_scale)
    r = layer.lora_A[0].weight.shape[0]
    for i in range(n):
        a, b, s = layer.lora_A[i].weight, layer.lora_B[i].weight, layer.lora_scale[i]
        y = y + (ALPHA / r) * s * ((x @ a.t()) @ b.t())
    return y


def count(layer):
    n, r = len(layer.lora_scale), layer.lora_A[0].weight.shape[0]
    return n * (r * (layer.in_features + layer.out_features) + layer.out_features)


def trainable(layer):
    n = len(layer.lora_scale)
    return ({f"lora_A.{i}.weight" for i in range(n)} | {f"lora_B.{i}.weight" for i in range(n)}
            | {f"lora_scale.{i}" for i in range(n)})


CASES = [
    VariantCase(
        variant="multilora", id="multilora",
        specs={"llama": "attn.* -> multilora(n=3, r=4, alpha=8)", "gpt2": "attn.* -> multilora(n=2, r=4, alpha=8)",
               "bert": "attn.* -> multilora(n=4, r=2, alpha=8)"},
        reference=reference, count=count, trainable=trainable,
        unsupported={"llama": "embed_tokens -> multilora(r=4)", "gpt2": "ln_f -> multilora(r=4)",
                     "bert": "embeddings.LayerNorm -> multilora(r=4)"}),
    VariantCase(
        variant="multilora", id="multilora-mlp",
        specs={"llama": "mlp.* -> multilora(r=2, alpha=8, dropout=0.1)"},
        reference=reference, count=count, trainable=trainable),
]
