"""LQ-LoRA (Guo et al. 2023): y = deq(Q) x + b + s B A x, s = alpha/r, with W ~= Q + L1 L2 at init.

The reference decodes the ``lq`` base from its packed bytes with numpy (little-endian bitstream,
NF-b codebook rebuilt here in float64 from the paper's construction, two-level scales) -- not
with the layer's own dequantize. The ``nf4`` case reads W0 through bitsandbytes (as QDoRA's case).
At init the model is the decomposition, not the base, so ``equals_base_at_init`` is false.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import norm

from . import VariantCase, base_bias, base_weight_out_in

S = 16 / 4  # alpha=16, r=4 in every spec below


def nf_values(bits: int) -> np.ndarray:
    half = 2 ** (bits - 1)
    pos = norm.ppf(np.linspace(0.9677083, 0.5, half + 1)[:-1])
    neg = -norm.ppf(np.linspace(0.9677083, 0.5, half)[:-1])
    values = np.sort(np.concatenate([pos, [0.0], neg]))
    return values / values.max()


def unpack(data: torch.Tensor, bits: int, count: int) -> np.ndarray:
    stream = np.unpackbits(data.cpu().numpy(), bitorder="little")[: count * bits].reshape(count, bits)
    return stream.astype(np.int64) @ (1 << np.arange(bits))


def decode_lq(base) -> torch.Tensor:
    c = base.config
    n = base.in_features * base.out_features
    nb = -(-n // c.B0)
    c0 = unpack(base.qscale, c.b0, nb)
    s2 = base.scale2.float().cpu().numpy().astype(np.float64)
    scale = c0 * s2[np.arange(nb) // c.B1] / (2 ** c.b0 - 1) + float(base.offset)
    w = nf_values(c.bits)[unpack(base.qweight, c.bits, n)] * scale[np.arange(n) // c.B0]
    return torch.tensor(w.reshape(base.out_features, base.in_features), dtype=torch.float32)


def reference(layer, x):
    base = layer.base_layer
    w0 = decode_lq(base) if type(base).__name__ == "LqLinear" else base_weight_out_in(layer).float()
    y = x.float() @ w0.t() + S * (x.float() @ layer.lora_A.weight.t()) @ layer.lora_B.weight.t()
    b = base_bias(layer)
    return y + b if b is not None else y


def count(layer):
    return layer.r * (layer.in_features + layer.out_features)


TRAINABLE = {"lora_A.weight", "lora_B.weight"}

CASES = [
    VariantCase(
        variant="lqlora", id="lqlora",
        specs={"llama": "attn.* -> lqlora(r=4, alpha=16) on lq(budget=3, rank=4)",
               "gpt2": "attn.* -> lqlora(r=4, alpha=16) on lq(bits=3, B0=32)",
               "bert": "attn.* -> lqlora(r=4, alpha=16) on lq(bits=2, b0=4, B0=16, b1=bf16, B1=16)"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE, equals_base_at_init=False,
        unsupported={"llama": "model.norm -> lqlora(r=4) on lq(bits=4)", "gpt2": "ln_f -> lqlora(r=4) on lq",
                     "bert": "embeddings.word_embeddings -> lqlora(r=4) on lq"}),
    # the decomposition with bitsandbytes NF4 (+ double quantization) as the quantizer
    VariantCase(
        variant="lqlora", id="lqlora-nf4",
        specs={"llama": "mlp.* -> lqlora(r=4, alpha=16, iters=10) on nf4"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE, equals_base_at_init=False),
]
