"""VeRA (Kopiczko et al. 2023): y = W0 x + b0 + b ⊙ (B[:out] (d ⊙ (A[:, :in] x))).

A, B are frozen and shared by every layer (sliced per layer); only d (r) and b (out) train.
"""

from __future__ import annotations

from . import VariantCase, linear_base


def reference(layer, x):
    n_in, n_out = layer.in_features, layer.out_features
    A, B = layer.vera_A[:, :n_in], layer.vera_B[:n_out, :]
    d, b = layer.vera_lambda_d, layer.vera_lambda_b
    return linear_base(layer, x) + b * (((x @ A.t()) * d) @ B.t())


def count(layer):
    return layer.r + layer.out_features


TRAINABLE = {"vera_lambda_d", "vera_lambda_b"}

CASES = [
    VariantCase(
        variant="vera", id="vera",
        specs={"llama": "attn.* -> vera(r=16)", "gpt2": "attn.* -> vera(r=8)",
               "bert": "attn.* -> vera(r=8, save_projection=false)"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE,
        unsupported={"llama": "model.norm -> vera(r=4)", "gpt2": "ln_f -> vera(r=4)",
                     "bert": "embeddings.LayerNorm -> vera(r=4)"}),
    VariantCase(  # the paper's defaults (r = 256 > hidden 64 on the tiny model) on attention + MLP
        variant="vera", id="vera-defaults",
        specs={"llama": "layers.*.* -> vera()"},
        reference=reference, count=count, trainable=lambda layer: TRAINABLE),
]
