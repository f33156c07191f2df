"""Bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2020) after a module's output h:
y = h + W_up f(W_down h + b_down) + b_up. Not mergeable (f is non-linear)."""

from __future__ import annotations

import math

import torch

from . import VariantCase, linear_base


def act(name: str, z: torch.Tensor) -> torch.Tensor:
    if name == "relu":
        return torch.where(z > 0, z, torch.zeros_like(z))
    if name == "gelu":
        return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
    if name == "silu":
        return z / (1 + torch.exp(-z))
    if name == "tanh":
        return (torch.exp(z) - torch.exp(-z)) / (torch.exp(z) + torch.exp(-z))
    raise AssertionError(name)


def reference(layer, x):
    h = linear_base(layer, x)
    z = act(layer.act, h @ layer.down.weight.t() + layer.down.bias)
    return h + z @ layer.up.weight.t() + layer.up.bias


def count(layer):
    m, d = layer.size, layer.out_features
    return 2 * m * d + m + d


TRAINABLE = {"down.weight", "down.bias", "up.weight", "up.bias"}

CASES = [
    VariantCase(
        variant="bottleneck", id="bottleneck",
        specs={  # Houlsby: after attention output and FFN; Pfeiffer (gpt2): after the FFN only
            "llama": "attn.o_proj -> bottleneck(size=8)\nmlp.down_proj -> bottleneck(size=8)",
            "gpt2": "mlp.c_proj -> bottleneck(size=8, act=gelu_tanh)",
            "bert": "attention.output.dense -> bottleneck(reduction_factor=8, act=gelu)\n"
                    "layer.*.output.dense -> bottleneck(reduction_factor=8, act=gelu)"},
        reference=reference, count=count, trainable=lambda layer: set(TRAINABLE), mergeable=False,
        unsupported={"llama": "model.norm -> bottleneck(size=8)", "gpt2": "ln_f -> bottleneck(size=8)",
                     "bert": "embeddings.LayerNorm -> bottleneck(size=8)"}),
    VariantCase(
        variant="bottleneck", id="bottleneck-houlsby-init",  # the paper's near-identity init: not exact
        specs={"llama": "attn.o_proj -> bottleneck(size=4, act=silu, init=houlsby)\n"
                        "mlp.down_proj -> bottleneck(size=4, act=tanh, init=houlsby)"},
        reference=reference, count=count, trainable=lambda layer: set(TRAINABLE), mergeable=False,
        equals_base_at_init=False),
]
