"""(IA)^3 (Liu et al. 2022): y = l ⊙ (W0 x + b) on k/v projections; y = W0 (l ⊙ x) + b on the FFN's
second matrix (``feedforward=true``). ``l`` starts at 1, so the model equals the base at init."""

from __future__ import annotations

from . import VariantCase, linear_base


def reference(layer, x):
    l = layer.ia3_l.reshape(-1)
    if layer.feedforward:
        return linear_base(layer, x * l)
    return l * linear_base(layer, x)


def count(layer):
    return layer.in_features if layer.feedforward else layer.out_features


CASES = [
    VariantCase(
        variant="ia3", id="ia3",
        specs={"llama": "attn.{k,v}_proj -> ia3\nmlp.down_proj -> ia3(feedforward=true)",
               "gpt2": "attn.c_attn -> ia3\nmlp.c_proj -> ia3(feedforward=true)",
               "bert": "attention.self.{key,value} -> ia3\nlayer.*.output.dense -> ia3(feedforward=true)"},
        reference=reference, count=count, trainable=lambda layer: {"ia3_l"},
        unsupported={"llama": "model.norm -> ia3", "gpt2": "ln_f -> ia3", "bert": "embeddings.word_embeddings -> ia3"}),
    VariantCase(
        variant="ia3", id="ia3-swapped-sides",  # input-side on attention, output-side on the FFN
        specs={"gpt2": "attn.c_attn -> ia3(feedforward=true)\nmlp.c_fc -> ia3",
               "bert": "attention.output.dense -> ia3(feedforward=true)\nintermediate.dense -> ia3"},
        reference=reference, count=count, trainable=lambda layer: {"ia3_l"}),
]
