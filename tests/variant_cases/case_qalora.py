"""QA-LoRA (Xu et al. 2023): y = W~ x + b + s B A avgpool_L(x), s = alpha/r, A: r x in/L.

The reference works in weight space instead of pooling the input: the update equals the dense
matrix ``(s/L) kron(B A, 1_{1 x L})`` (every pooled column repeated over its ``L`` inputs), so
``y = x (W~ + dW)^T + b``. W~ is the dequantized intN base; the init test compares with the
same layers quantized by the same intN quantizer and group (``base_spec``).
"""

from __future__ import annotations

import torch

from . import VariantCase, base_bias, base_weight_out_in

R, ALPHA = 4, 16


def reference(layer, x):
    group = layer.base_layer.group
    ba = layer.lora_B.weight @ layer.lora_A.weight  # out x in/L
    dense_delta = torch.kron(ba, torch.ones(1, group, dtype=ba.dtype)) * (ALPHA / R / group)
    weight = base_weight_out_in(layer).float() + dense_delta
    y = x.float() @ weight.t()
    b = base_bias(layer)
    return y + b if b is not None else y


def count(layer):
    return layer.r * (layer.in_features // layer.base_layer.group) + layer.r * layer.out_features


TRAINABLE = {"lora_A.weight", "lora_B.weight"}
ADAPTER = f"qalora(r={R}, alpha={ALPHA})"

CASES = [
    VariantCase(
        variant="qalora", id="qalora-int4",
        specs={"llama": f"attn.* -> {ADAPTER} on int4(group=16)",
               "gpt2": f"attn.* -> {ADAPTER} on int4(group=32)",  # c_attn 64 -> 192, c_proj 64 -> 64
               "bert": f"attn.* -> {ADAPTER} on int4(group=16)"},
        base_spec={"llama": "attn.* -> freeze on int4(group=16)", "gpt2": "attn.* -> freeze on int4(group=32)",
                   "bert": "attn.* -> freeze on int4(group=16)"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE,
        unsupported={"llama": f"model.embed_tokens -> {ADAPTER} on int4", "gpt2": f"ln_f -> {ADAPTER} on int4",
                     "bert": f"embeddings.LayerNorm -> {ADAPTER} on int4"}),
    # INT3 / INT2 over the MLP (in_features 64 and 128; GPT-2 c_proj 256)
    VariantCase(
        variant="qalora", id="qalora-int3",
        specs={"llama": f"mlp.* -> {ADAPTER} on int3(group=32)", "gpt2": f"mlp.* -> {ADAPTER} on int3(group=64)"},
        base_spec={"llama": "mlp.* -> freeze on int3(group=32)", "gpt2": "mlp.* -> freeze on int3(group=64)"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE),
    VariantCase(
        variant="qalora", id="qalora-int2",
        specs={"llama": f"mlp.* -> {ADAPTER} on int2(group=64, scale_dtype=float32)"},
        base_spec={"llama": "mlp.* -> freeze on int2(group=64, scale_dtype=float32)"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE),
]
