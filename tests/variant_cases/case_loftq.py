"""LoftQ (Li et al. 2023): after its init a LoRA on the quantized base, y = deq(Q) x + b + s B A x.

The reference computes that formula from the layer's tensors: the dequantized runtime base
(``base_layer.dequantize()``), its bias and ``lora_A``/``lora_B``, with ``s`` from the spec's alpha
and r. LoftQ's init does not equal any base (deq(Q) + s B A ~= W, with Q = q(W - s B A)), so
``equals_base_at_init=False``: the matrix then checks the outputs differ from the fp32 model's; how
much closer they are to it than plain QLoRA's is tested in tests/test_loftq.py.
"""

from __future__ import annotations

import math

from . import VariantCase, linear_base


def reference(layer, x):
    s = 16 / math.sqrt(4) if layer.rslora else 16 / 4  # alpha=16, r=4 in every spec below
    return linear_base(layer, x) + s * (x @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()


def count(layer):
    return layer.r * (layer.in_features + layer.out_features)


def trainable(layer):
    return {"lora_A.weight", "lora_B.weight"}


CASES = [
    VariantCase(
        variant="loftq", id="loftq",
        specs={"llama": "attn.* -> loftq(r=4, alpha=16, iters=2) on nf4",
               "gpt2": "attn.* -> loftq(r=4, alpha=16, iters=2) on int8",  # Conv1D, transposed to out x in
               "bert": "attn.* -> loftq(r=4, alpha=16) on fp4(blocksize=32, double_quant=false)"},
        reference=reference, count=count, trainable=trainable, equals_base_at_init=False,
        unsupported={"llama": "model.embed_tokens -> loftq(r=4) on nf4", "gpt2": "ln_f -> loftq(r=4) on nf4",
                     "bert": "embeddings.LayerNorm -> loftq(r=4) on nf4"}),
    VariantCase(
        variant="loftq", id="loftq-rslora",
        specs={"llama": "mlp.* -> loftq(r=4, alpha=16, rslora=true, iters=3) on nf4"},
        reference=reference, count=count, trainable=trainable, equals_base_at_init=False),
]
