"""Stacking: several adapters active at once on one model, without merging them.

    model = adapterhub.stack(model, ["medical@v3", "out/code-bundle"], weights=[1.0, 0.5])
    adapterhub.stacking.set_active(model, [0])     # only the first one
    adapterhub.merge(model) / adapterhub.unmerge(model)

Every module that any of the adapters targets becomes a :class:`StackLayer`: it holds the module
(the shared base, quantized once when the bundles say ``on QUANT`` -- they must agree) and, for each
adapter ``i`` that targets it, the adapter layer its variant's ``wrap`` builds around that same base
(tensors named ``<module>.stack.<i>.<tensor>``). With ``y0 = base(x)``

    forward(x) = y0 + Σ_{i active} w_i (adapter_i(x) - y0)

which for additive variants (LoRA, VeRA, IA3 on the input, ...) is ``base(x) + Σ w_i update_i(x)``
and for any other variant (DoRA, IA3, GLoRA, bottleneck, ...) is still each adapter's own effect.
The base runs once per forward: while the adapters run, a call of the base on the very same input
object returns a copy of ``y0`` instead of recomputing it (variants that feed the base something else
-- IA3's input scaling -- do run it). ``merge`` folds ``Σ w_i ΔW_i`` (and ``Σ w_i Δb_i``) into the
base; ``unmerge`` restores it exactly. Attached adapters (prefix) and container targets cannot be
stacked; ``train`` rules (modules_to_save) neither -- both are refused by name.

The bundle's layers are rebuilt around the shared bases with :mod:`adapterhub.rebuild`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub.registry import AdapterhubError, AdapterLayer, Registry, get_registry

from .rebuild import (
    BundleInfo,
    bundle_entries,
    check_fingerprint,
    common_quant,
    load_layer_tensors,
    quantize_module,
    refuse_unstackable,
    wrap_entries,
)
from .surgery import replace_module

# --------------------------------------------------------------------------- the layer


class _Slot(nn.Module):
    """One stacked adapter's tensors: the layer's parameters, buffers and children (its base left
    out), shared with the layer itself -- so ``model.to()``, ``state_dict`` and optimizers see them
    while no ``AdapterLayer`` is nested inside another (``adapter_layers`` finds only the stack)."""

    def __init__(self, layer: AdapterLayer):
        super().__init__()
        base = layer._modules.pop("base_layer", None)
        if base is not None:
            layer.__dict__["base_layer"] = base
        self.__dict__["_parameters"] = layer._parameters
        self.__dict__["_buffers"] = layer._buffers
        self.__dict__["_non_persistent_buffers_set"] = layer._non_persistent_buffers_set
        self.__dict__["_modules"] = layer._modules
        self.__dict__["layer"] = layer


@contextmanager
def _reuse_output(base: nn.Module, x: Any, y0: torch.Tensor) -> Iterator[None]:
    """While active, ``base(x)`` with this very ``x`` (and no other arguments) returns a copy of ``y0``."""
    had = "forward" in base.__dict__
    previous = base.__dict__.get("forward")
    original = base.forward

    def forward(inp: Any, *args: Any, **kwargs: Any) -> Any:
        if inp is x and not args and not kwargs:
            return y0.clone()
        return original(inp, *args, **kwargs)

    base.__dict__["forward"] = forward
    try:
        yield
    finally:
        if had:
            base.__dict__["forward"] = previous
        else:
            del base.__dict__["forward"]


class StackLayer(AdapterLayer):
    """Several adapter layers on one shared base (see the module docstring)."""

    variant = "stack"
    delta_reads_base = True
    exact_unmerge = True

    def __init__(self, base_layer: nn.Module, layers: Mapping[int, AdapterLayer], weights: Mapping[int, float]):
        super().__init__(base_layer)
        self.stack = nn.ModuleDict({str(i): _Slot(layer) for i, layer in sorted(layers.items())})
        self.weights = {i: float(weights[i]) for i in sorted(layers)}
        self.active = sorted(layers)

    def layers(self) -> dict[int, AdapterLayer]:
        """``{adapter index: its layer}``."""
        return {int(i): slot.layer for i, slot in self.stack.items()}

    def set_active(self, indices: Iterable[int]) -> None:
        self.active = sorted(int(i) for i in indices if str(i) in self.stack)

    def train(self, mode: bool = True) -> StackLayer:
        super().train(mode)
        for layer in self.layers().values():
            layer.training = mode
        return self

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``y0 + Σ w_i (adapter_i(x) - y0)``, the base run once."""
        base = self.base_layer
        y0 = base(x, *args, **kwargs)
        if not self.active:
            return y0
        layers = self.layers()
        out = None
        with _reuse_output(base, x, y0):
            for i in self.active:
                w = self.weights[i]
                y = layers[i].adapted_forward(x, *args, **kwargs)
                if out is None and w == 1.0:
                    out = y
                else:
                    term = (y - y0) * w
                    out = (y0 if out is None else out) + term.to(y0.dtype)
        return out

    def _active_sum(self, fn: str) -> torch.Tensor | None:
        layers, total = self.layers(), None
        for i in self.active:
            d = getattr(layers[i], fn)()
            if d is None:
                continue
            d = d.float() * self.weights[i] if d.dtype != torch.float64 else d * self.weights[i]
            total = d if total is None else total + d
        return total

    def delta_weight(self) -> torch.Tensor:
        """``Σ_{i active} w_i ΔW_i`` in the base module's layout."""
        total = self._active_sum("delta_weight")
        if total is None:
            w = self.base_weight()
            return self.to_base_layout(torch.zeros(w.shape, dtype=torch.float32, device=w.device))
        return total

    def delta_bias(self) -> torch.Tensor | None:
        """``Σ_{i active} w_i Δb_i`` over the adapters that change the bias, else ``None``."""
        return self._active_sum("delta_bias")

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"stack.{i}.{k}": t for i, layer in self.layers().items()
                for k, t in layer.adapter_state_dict().items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for layer in self.layers().values():
            for p in layer.trainable_parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def extra_repr(self) -> str:
        return f"adapters={[int(i) for i in self.stack]}, active={self.active}, weights={self.weights}"


# --------------------------------------------------------------------------- the model


@dataclass
class Stacked:
    """What :func:`stack` did, kept on the model as ``model.adapterhub_stack``."""

    sources: list[str]
    weights: list[float]
    active: list[int]
    modules: list[str]


def stacked(model: nn.Module) -> Stacked | None:
    return model.__dict__.get("adapterhub_stack")


def stack(model: nn.Module, sources: Sequence[str | os.PathLike], weights: Sequence[float] | None = None, *,
          check_base: bool = True, registry: Registry | None = None) -> nn.Module:
    """Put the adapters of ``sources`` (bundle directories, stored versions, ``hf://`` repos, PEFT
    directories) on ``model`` at once, each scaled by its weight (default 1); returns the model."""
    sources = list(sources)
    if not sources:
        raise AdapterhubError("stack needs at least one adapter")
    return stack_bundles(model, [bundle_entries(s, model) for s in sources], weights, check_base=check_base,
                         registry=registry)


def stack_bundles(model: nn.Module, infos: Sequence[BundleInfo], weights: Sequence[float] | None = None, *,
                  check_base: bool = True, registry: Registry | None = None, what: str = "stack") -> nn.Module:
    """:func:`stack` for bundles already read with :func:`bundle_entries`."""
    from .fingerprint import model_fingerprint
    from .surgery import applied

    registry = registry or get_registry()
    if applied(model) is not None or stacked(model) is not None:
        raise AdapterhubError("this model already has adapters; stack onto a fresh model")
    weights = [1.0] * len(infos) if weights is None else [float(w) for w in weights]
    if len(weights) != len(infos):
        raise AdapterhubError(f"{what} got {len(infos)} adapters but {len(weights)} weights")
    fingerprint = model_fingerprint(model) if check_base else None
    for info in infos:
        if check_base:
            check_fingerprint(info, model, fingerprint)
        refuse_unstackable(info, registry, what)
    quant = common_quant(infos, what)
    bases: dict[str, nn.Module] = {}
    for name, (entry, _) in quant.items():
        module = model.get_submodule(name)
        bases[name] = quantize_module(module, entry, registry)
        if bases[name] is not module:
            replace_module(model, name, bases[name])
    per_module: dict[str, dict[int, AdapterLayer]] = {}
    for i, info in enumerate(infos):
        layers = wrap_entries(bases, info.entries, info.seed, registry, model)
        load_layer_tensors(layers, info.directory, info.source)
        for name, layer in layers.items():
            per_module.setdefault(name, {})[i] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layers in per_module.items():
        layer = StackLayer(bases[name], layers, dict(enumerate(weights)))
        for p in layer.trainable_parameters():
            p.requires_grad_(True)
        replace_module(model, name, layer)
    model.__dict__["adapterhub_stack"] = Stacked([info.source for info in infos], weights,
                                                 list(range(len(infos))), sorted(per_module))
    return model


def _stack_layers(model: nn.Module) -> list[StackLayer]:
    if stacked(model) is None:
        raise AdapterhubError("this model has no stacked adapters (see adapterhub.stack)")
    return [m for m in model.modules() if isinstance(m, StackLayer)]


def _indices(info: Stacked, which: Iterable[int | str]) -> list[int]:
    out = []
    for w in which:
        if isinstance(w, int) and not isinstance(w, bool) and 0 <= w < len(info.sources):
            out.append(w)
        elif isinstance(w, str) and w in info.sources:
            out.append(info.sources.index(w))
        else:
            raise AdapterhubError(f"no stacked adapter {w!r} (adapters: {list(range(len(info.sources)))} = "
                                  f"{info.sources})")
    return sorted(set(out))


def set_active(model: nn.Module, which: Iterable[int | str] | None = None) -> None:
    """Switch the stacked adapters on/off: ``which`` (indices or source names) on, the rest off;
    ``None``: all on. Call it while unmerged."""
    layers = _stack_layers(model)
    info = stacked(model)
    assert info is not None
    if any(layer.merged for layer in layers):
        raise AdapterhubError("unmerge the stacked model before switching adapters")
    info.active = list(range(len(info.sources))) if which is None else _indices(info, which)
    for layer in layers:
        layer.set_active(info.active)


def set_weights(model: nn.Module, weights: Sequence[float]) -> None:
    """Change the adapters' weights (one per stacked adapter). Call it while unmerged."""
    layers = _stack_layers(model)
    info = stacked(model)
    assert info is not None
    if len(weights) != len(info.sources):
        raise AdapterhubError(f"{len(info.sources)} adapters are stacked, got {len(weights)} weights")
    if any(layer.merged for layer in layers):
        raise AdapterhubError("unmerge the stacked model before changing weights")
    info.weights = [float(w) for w in weights]
    for layer in layers:
        layer.weights = {i: info.weights[i] for i in layer.weights}


def unstack(model: nn.Module) -> nn.Module:
    """Remove the stacked adapters (unmerging first): the model as it was before :func:`stack`, except
    that bases quantized for the adapters (``on QUANT``) stay quantized."""
    info = stacked(model)
    if info is None:
        raise AdapterhubError("this model has no stacked adapters")
    for name, mod in list(model.named_modules()):
        if isinstance(mod, StackLayer):
            mod.unmerge()
            replace_module(model, name, mod.base_layer)
    del model.__dict__["adapterhub_stack"]
    return model
