"""Prefix tuning (Li & Liang 2021): every layer attends over [P_K; K], [P_V; V]; P = MLP(P') in training.

The reference recomputes P from the layer's tensors (tanh MLP, PEFT's K/V column layout) and runs the
*unadapted* base model with its own DynamicCache holding P plus an attention mask with p extra ones:
this checks the injection mechanics (cache, mask, positions), not attention itself (that is checked
by hand in tests/test_prefix.py).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

import adapterhub

from . import VariantCase

TENSORS = {"embedding.weight", "transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"}


def dims(config) -> tuple[int, int, int, int]:
    """(layers, hidden, kv_heads, head_dim) from a transformers config."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return layers, hidden, kv_heads, hidden // heads


def table(layer, config) -> torch.Tensor:
    """P as p x L x 2 x kv_heads x head_dim: row i of MLP(P') = [K_0 | V_0 | K_1 | V_1 | ...]."""
    flat = layer.embedding.weight
    if layer.projection:
        lin1, lin2 = layer.transform[0], layer.transform[2]
        flat = torch.tanh(flat @ lin1.weight.t() + lin1.bias) @ lin2.weight.t() + lin2.bias
    layers, _, kv_heads, head_dim = dims(config)
    return flat.reshape(flat.shape[0], layers, 2, kv_heads, head_dim)


def the_layer(model):
    (layer,) = [lyr for _, lyr in adapterhub.adapter_layers(model)]
    return layer


def reference_model(model, base_model, ids, attention_mask=None):
    t = table(the_layer(model), base_model.config)
    p, batch = t.shape[0], ids.shape[0]
    cache = DynamicCache()
    for layer in range(t.shape[1]):
        k = t[:, layer, 0].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        v = t[:, layer, 1].permute(1, 0, 2).unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(k, v, layer)
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    mask = torch.cat([torch.ones(batch, p, dtype=attention_mask.dtype), attention_mask], dim=1)
    with torch.no_grad():
        return base_model(input_ids=ids, past_key_values=cache, attention_mask=mask).logits


def block_sizes(block) -> tuple[int, int]:
    """(hidden, kv_dim) read off a block's projections (Llama k_proj; GPT-2 c_attn holds q, k, v)."""
    attn = getattr(block, "self_attn", None) or block.attn
    if hasattr(attn, "k_proj"):
        return attn.k_proj.in_features, attn.k_proj.out_features
    return attn.c_attn.weight.shape[0], attn.c_attn.weight.shape[1] // 3


def count(layer) -> int:
    """p d + d h + h + h (2 L kv_dim) + 2 L kv_dim, or p (2 L kv_dim) without the MLP."""
    hidden, kv_dim = block_sizes(layer.base_layer[0])
    p, out = layer.embedding.weight.shape[0], 2 * len(layer.base_layer) * kv_dim
    if not layer.projection:
        return p * out
    h = layer.transform[0].weight.shape[0]
    return p * hidden + hidden * h + h + h * out + out


CASES = [
    VariantCase(
        variant="prefix", id="prefix",
        specs={"llama": "layers -> prefix(tokens=4)", "gpt2": "layers -> prefix(tokens=4)"},
        reference_model=reference_model, count=count, trainable=lambda layer: set(TENSORS),
        equals_base_at_init=False, mergeable=False,
        unsupported={"llama": "model.norm -> prefix(tokens=4)", "gpt2": "ln_f -> prefix(tokens=4)"}),
    VariantCase(
        variant="prefix", id="prefix-table",
        specs={"llama": "layers -> prefix(tokens=3, projection=false)",
               "gpt2": "layers -> prefix(tokens=3, projection=false)"},
        reference_model=reference_model, count=count, trainable=lambda layer: {"embedding.weight"},
        equals_base_at_init=False, mergeable=False),
    VariantCase(
        variant="prefix", id="prefix-hidden",
        specs={"llama": "layers -> prefix(tokens=2, projection_hidden=24)"},
        reference_model=reference_model, count=count, trainable=lambda layer: set(TENSORS),
        equals_base_at_init=False, mergeable=False),
]
