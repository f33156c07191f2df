"""Applying a plan to a live model: quantize, wrap, set what trains.

Contract: after ``apply`` only adapter tensors (and modules of ``train`` rules) require grad;
every adapter layer is an :class:`AdapterLayer` at the original module's name, holding the
original module as ``base_layer``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub.dsl import load_spec
from adapterhub.registry import AdapterhubError, AdapterLayer, ApplyContext, Registry, bind, get_registry

from .planning import Plan
from .planning import plan as make_plan


@dataclass
class Applied:
    """What ``apply`` did to a model, kept on it as ``model.adapterhub`` (used by ``save``)."""

    plan: Plan
    fingerprint: str
    seed: int


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """``(name, layer)`` for every adapter layer in ``model``."""
    for name, mod in model.named_modules():
        if isinstance(mod, AdapterLayer):
            yield name, mod


def applied(model: nn.Module) -> Applied | None:
    return model.__dict__.get("adapterhub")


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the module called ``name`` in ``model``."""
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the module called ``name`` is."""
    parent, child = parent_of(model, name)
    setattr(parent, child, new)


def apply(model: nn.Module, spec: Any, *, registry: Registry | None = None, seed: int = 0,
          plan: Plan | None = None) -> nn.Module:
    """Adapt ``model`` in place as ``spec`` (text, path or Spec) says, and return it.

    Base weights are frozen; ``on QUANT`` rules replace the base layer by its quantized form;
    variant rules wrap it; ``train`` rules make the module fully trainable. Adapter initialisation
    draws from ``seed`` without disturbing the caller's random state.
    """
    from .fingerprint import model_fingerprint

    if applied(model) is not None:
        raise AdapterhubError("this model already has adapters from adapterhub.apply; load a fresh model "
                              "(to activate several adapters at once, use adapterhub.stack)")
    registry = registry or get_registry()
    spec = load_spec(spec)
    the_plan = plan or make_plan(model, spec, registry)
    fingerprint = model_fingerprint(model)
    by_index = {br.index: br for br in the_plan.bound}
    ctx = ApplyContext(model=model, seed=seed)
    train_modules = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for entry in reversed(the_plan.entries):  # deepest first: wrapping a container renames its leaves
            if entry.action == "skip":
                continue
            br = by_index[entry.rule_index]
            module = model.get_submodule(entry.module)
            qparams = bind(br.quantizer.Params, entry.quant_params, owner=br.quantizer.name) if entry.quant else None
            joint = entry.quant is not None and entry.action == "variant" and br.variant.owns_quantization
            if entry.quant is not None and not joint:
                module = br.quantizer.quantize(module, qparams)
                replace_module(model, entry.module, module)
            if entry.action == "variant":
                if joint:
                    layer = br.variant.wrap_quantized(module, br.params, br.quantizer, qparams, ctx, entry.module)
                else:
                    layer = br.variant.wrap(module, br.params, ctx, entry.module)
                if not isinstance(layer, AdapterLayer):
                    raise AdapterhubError(f"variant {br.variant.name} returned {type(layer).__name__}, "
                                          "not an AdapterLayer")
                if br.variant.attach:
                    parent, child = parent_of(model, entry.module)
                    parent.add_module(f"{child}_{br.variant.name}", layer)
                else:
                    replace_module(model, entry.module, layer)
            elif entry.action == "train":
                train_modules.append(module)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in adapter_layers(model):
        for p in layer.trainable_parameters():
            p.requires_grad_(True)
    for module in train_modules:
        for p in module.parameters():
            p.requires_grad_(True)
    model.__dict__["adapterhub"] = Applied(the_plan, fingerprint, seed)
    return model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def merge(model: nn.Module) -> nn.Module:
    """Merge every adapter layer into its base weight (outputs unchanged, adapters inactive)."""
    for _, layer in adapter_layers(model):
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    for _, layer in adapter_layers(model):
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put each base layer back in its place: a plain model again.

    Raises :class:`NotMergeableError` (before changing anything) if any adapter cannot merge.
    Attached adapters are removed after merging; the model no longer counts as adapted.
    """
    from adapterhub.registry import NotMergeableError

    layers = list(adapter_layers(model))
    for name, layer in layers:
        if not _mergeable(layer):
            raise NotMergeableError(f"adapter '{name}' ({layer.variant}) cannot be merged into the base weights; "
                                    "remove it or keep the model unmerged")
    info = applied(model)
    conv1d = {e.module for e in info.plan.entries if e.type_name == "Conv1D"} if info is not None else set()
    for name, layer in layers:
        layer.merge()
        if layer.attached:
            parent, child = parent_of(model, name)
            delattr(parent, child)
        else:
            base = layer.base_layer
            if name in conv1d and type(base) is nn.Linear:  # a quantized Conv1D merged into a dense Linear
                base = _as_conv1d(base)
            replace_module(model, name, base)
    model.__dict__.pop("adapterhub", None)
    return model


def _as_conv1d(linear: nn.Linear) -> nn.Module:
    """GPT-2's ``Conv1D`` holding ``linear``'s function (its weight stored ``in x out``), so that a merged
    model saves the layout its architecture loads."""
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(linear.out_features, linear.in_features).to(device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    return conv.requires_grad_(False)


def _mergeable(layer: AdapterLayer) -> bool:
    from adapterhub.registry import get_registry

    variant = get_registry().variants.get(layer.variant)
    return variant.mergeable if variant is not None else True
