"""Tied-LoRA (Renduchintala et al. 2023): y = W0 x + b0 + s v ⊙ (B (u ⊙ (A x))), s = alpha/r.

A and B are tied across every wrapped layer of one (in, out) shape; u, v are per layer. ``config``
names the trainable factors; the count is r·in (A) + out·r (B) once per tie group plus r (u) +
out (v) per layer, each only if trained.
"""

from __future__ import annotations

import adapterhub

from . import VariantCase, linear_base

LETTER_NAMES = {"v": "tied_lora_v", "B": "tied_lora_B", "u": "tied_lora_u", "A": "tied_lora_A"}


def reference(s: float):
    def ref(layer, x):
        A, B, u, v = layer.tied_lora_A, layer.tied_lora_B, layer.tied_lora_u, layer.tied_lora_v
        return linear_base(layer, x) + s * (((x @ A.t()) * u) @ B.t()) * v
    return ref


def trainable(config: str):
    return lambda layer: {LETTER_NAMES[c] for c in config}


def per_layer(config: str, r: int):
    return lambda layer: r * ("u" in config) + layer.out_features * ("v" in config)


def per_model(config: str, r: int):
    """Per tie group (one per (in, out) shape) r·in + out·r for trained A/B, plus the per-layer part."""
    def count(model):
        shapes = set()
        total = 0
        for _, layer in adapterhub.adapter_layers(model):
            shapes.add((layer.in_features, layer.out_features))
            total += r * ("u" in config) + layer.out_features * ("v" in config)
        for n_in, n_out in shapes:
            total += r * n_in * ("A" in config) + n_out * r * ("B" in config)
        return total
    return count


def case(config: str, specs: dict[str, str], r: int, alpha: float, **kw) -> VariantCase:
    return VariantCase(variant="tied_lora", id=f"tied_lora-{config}", specs=specs,
                       reference=reference(alpha / r), trainable=trainable(config), count=per_layer(config, r),
                       count_model=per_model(config, r), **kw)


CASES = [
    case("vBuA", {"llama": "attn.* -> tied_lora(r=4, alpha=16)", "gpt2": "attn.* -> tied_lora(r=4, alpha=16)",
                  "bert": "attn.* -> tied_lora(r=4, alpha=16)"}, r=4, alpha=16.0,
         unsupported={"llama": "model.norm -> tied_lora(r=4)", "gpt2": "ln_f -> tied_lora(r=4)",
                      "bert": "embeddings.LayerNorm -> tied_lora(r=4)"}),
    # u, A frozen (u = 1, A random); B = 0 trains
    case("vB", {"llama": "mlp.* -> tied_lora(r=4, alpha=8, config=\"Bv\")"}, r=4, alpha=8.0),
    # A, B frozen random (VeRA-like, tied): v starts at 0
    case("vu", {"gpt2": "attn.* -> tied_lora(r=4, alpha=8, config=\"uv\")"}, r=4, alpha=8.0),
    # B and v frozen: u starts at 0
    case("uA", {"bert": "attn.* -> tied_lora(r=4, alpha=8, config=\"uA\")"}, r=4, alpha=8.0),
]
