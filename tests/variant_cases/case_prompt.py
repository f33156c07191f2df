"""Prompt tuning (Lester et al. 2021): the model runs on [P ; E[x]]; outputs for the p virtual
positions are dropped. Reference: the unadapted base model on inputs_embeds = cat(P, E[x]) with p
extra ones in the attention mask, logits[:, p:]."""

from __future__ import annotations

import torch

import adapterhub

from . import VariantCase


def the_layer(model):
    (layer,) = [lyr for _, lyr in adapterhub.adapter_layers(model)]
    return layer


def reference_model(model, base_model, ids, attention_mask=None):
    prompt = the_layer(model).prompt_embeddings
    p, batch = prompt.shape[0], ids.shape[0]
    embeds = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), base_model.get_input_embeddings()(ids)], dim=1)
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    mask = torch.cat([torch.ones(batch, p, dtype=attention_mask.dtype), attention_mask], dim=1)
    with torch.no_grad():
        return base_model(inputs_embeds=embeds, attention_mask=mask).logits[:, p:]


def count(layer) -> int:
    """p * d_emb."""
    return layer.prompt_embeddings.shape[0] * layer.base_layer.weight.shape[1]


def trainable(layer) -> set[str]:
    return {"prompt_embeddings"}


CASES = [
    VariantCase(
        variant="prompt", id="prompt",
        specs={"llama": "embed -> prompt(tokens=5)", "gpt2": "embed -> prompt(tokens=5)"},
        reference_model=reference_model, count=count, trainable=trainable,
        equals_base_at_init=False, mergeable=False,
        unsupported={"llama": "model.norm -> prompt(tokens=4)", "gpt2": "ln_f -> prompt(tokens=4)"}),
    VariantCase(
        variant="prompt", id="prompt-text",
        specs={"llama": 'embed -> prompt(tokens=7, init="text", text="Classify:")',
               "gpt2": 'embed -> prompt(tokens=3, init="text", text="Summarize the text")'},
        reference_model=reference_model, count=count, trainable=trainable,
        equals_base_at_init=False, mergeable=False),
    VariantCase(
        variant="prompt", id="prompt-vocab",
        specs={"gpt2": 'embed -> prompt(tokens=4, init="vocab", seed=3)'},
        reference_model=reference_model, count=count, trainable=trainable,
        equals_base_at_init=False, mergeable=False),
]
