"""Saved quantized bases for variants that build their own (LoftQ, LQ-LoRA: ``owns_quantization``).

Their quantized base ``Q`` comes out of an alternating quantize/SVD init on the full-precision
weights. A bundle stores each such base's buffers (codes, scales) in ``base_quant.safetensors`` as
``base_quant.<module>.<buffer>``, so loading restores the ``Q`` that training used instead of
re-running the init: faster, and independent of the base weights being bit-identical.

While :func:`restoring` is active (``adapterhub.load`` around its ``apply``), :func:`will_restore`
tells a variant's ``wrap_quantized`` that the loader overwrites this module's base buffers: it then
skips the init and builds the base's structure with one plain quantization of ``W``, with zero
adapter factors (the bundle's own tensors are loaded afterwards). :func:`saved_quant_params` gives
an allocating quantizer (``lq(budget=...)``) the per-module parameters the bundle recorded, so the
allocation is not recomputed either.

The streaming merge (``adapterhub merge``) reads the file lazily with :class:`SavedBaseFile`: the
header once (validated as :func:`read_saved_bases` validates the whole file), then one module's
buffers at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from adapterhub.registry import AdapterhubError, AdapterLayer, QuantizedLinear

FILE = "base_quant.safetensors"
KEY_PREFIX = "base_quant."

T = TypeVar("T")


@dataclass(frozen=True)
class Restoring:
    """Modules whose quantized base the loader restores, and the quantizer params the bundle recorded."""

    modules: frozenset[str]
    quant_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


_RESTORING: ContextVar[Restoring | None] = ContextVar("adapterhub_restoring_bases", default=None)


@contextmanager
def restoring(modules: frozenset[str], quant_params: Mapping[str, Mapping[str, Any]]) -> Iterator[None]:
    """Within this block, ``wrap_quantized`` of the listed modules skips its init (see the module docstring)."""
    token = _RESTORING.set(Restoring(frozenset(modules), dict(quant_params)))
    try:
        yield
    finally:
        _RESTORING.reset(token)


def will_restore(name: str) -> bool:
    """Whether the loader will overwrite the quantized base of module ``name`` with saved buffers."""
    state = _RESTORING.get()
    return state is not None and name in state.modules


def saved_quant_params(names: list[str]) -> dict[str, Mapping[str, Any]] | None:
    """The recorded quantizer params of every module in ``names`` (None unless all are restored)."""
    state = _RESTORING.get()
    if state is None or not names or not all(n in state.modules and n in state.quant_params for n in names):
        return None
    return {n: state.quant_params[n] for n in names}


def quantized_base(layer: AdapterLayer) -> QuantizedLinear | None:
    """The layer's quantized base (kept aside while the layer is merged), or None."""
    base = layer.base_layer
    if layer.merged:
        base = getattr(layer, "_merge_state", {}).get("quantized_base", base)
    return base if isinstance(base, QuantizedLinear) else None


def base_state(layers: list[tuple[str, AdapterLayer]]) -> dict[str, torch.Tensor]:
    """``base_quant.<module>.<buffer>`` -> buffer, for every given layer with a quantized base."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in layers:
        base = quantized_base(layer)
        if base is not None:
            for key, buf in base.named_buffers():
                out[f"{KEY_PREFIX}{name}.{key}"] = buf
    return out


def read_saved_bases(directory: Path, info: Any, adapted: set[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Read ``directory/base_quant.safetensors`` as the manifest's ``base_quant`` entry ``info``
    (``{"file", "modules", "bytes"}``) lists it: ``{module: {buffer: tensor}}``. ``adapted``: the
    modules the manifest adapts (a saved base for any other module is an error)."""
    modules = listed_modules(directory, info, adapted)
    path = directory / FILE
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise AdapterhubError(f"cannot read {path}: {exc}") from None
    return split_by_module(tensors, modules, str(path))


def listed_modules(directory: Path, info: Any, adapted: set[str]) -> list[str]:
    """The modules the manifest's ``base_quant`` entry ``info`` lists, checked: a well-formed entry,
    the file present, every module one the manifest adapts (``adapted``)."""
    modules = info.get("modules") if isinstance(info, dict) else None
    path = directory / FILE
    if not isinstance(modules, list) or not all(isinstance(n, str) for n in modules) or info.get("file") != FILE:
        raise AdapterhubError(f"bundle '{directory}': the manifest's base_quant entry is malformed (expected "
                              f'{{"file": "{FILE}", "modules": [module names]}})')
    if not path.is_file():
        raise AdapterhubError(f"bundle '{directory}': the manifest lists saved quantized bases, but {FILE} is missing")
    unknown = [n for n in modules if n not in adapted]
    if unknown:
        raise AdapterhubError(f"bundle '{directory}': {FILE} holds modules the manifest does not adapt: {unknown[:3]}")
    return modules


class SavedBaseFile:
    """``directory/base_quant.safetensors`` read one module at a time (the streaming merge keeps only
    a few tensors resident). Opening reads and checks the header against the manifest's entry
    ``info`` (as :func:`read_saved_bases` does); :meth:`read` then loads a single module's buffers."""

    def __init__(self, directory: Path, info: Any, adapted: set[str]):
        modules = listed_modules(directory, info, adapted)
        self.path = directory / FILE
        try:
            with safe_open(str(self.path), framework="pt") as f:
                keys = list(f.keys())
        except Exception as exc:
            raise AdapterhubError(f"cannot read {self.path}: {exc}") from None
        self.keys: dict[str, dict[str, str]] = split_by_module({k: k for k in keys}, modules, str(self.path))

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(self.keys)

    def read(self, module: str) -> dict[str, torch.Tensor]:
        """``{buffer: tensor}`` of ``module``'s saved base (only its tensors are read)."""
        if module not in self.keys:
            raise AdapterhubError(f"{self.path} holds no saved quantized base for module '{module}'")
        try:
            with safe_open(str(self.path), framework="pt") as f:
                return {buf: f.get_tensor(key) for buf, key in self.keys[module].items()}
        except Exception as exc:
            raise AdapterhubError(f"cannot read {self.path}: {exc}") from None


def restore_bases(layers: Mapping[str, AdapterLayer], bases: Mapping[str, Mapping[str, torch.Tensor]],
                  where: str) -> None:
    """Copy each saved base into the quantized base of ``layers[module]`` (see :func:`restore_base`)."""
    for name, saved in bases.items():
        layer = layers.get(name)
        base = quantized_base(layer) if layer is not None else None
        if base is None:
            raise AdapterhubError(f"{where}: module '{name}' has a saved quantized base, but this model has no "
                                  "quantized adapter layer there")
        restore_base(base, saved, f"{where}, module '{name}'")


def split_by_module(tensors: Mapping[str, T], modules: list[str], where: str) -> dict[str, dict[str, T]]:
    """``{module: {buffer: tensor}}`` from a ``base_quant.safetensors`` mapping (longest module name wins);
    the values are passed through (tensors, or the keys themselves to plan lazy reads)."""
    out: dict[str, dict[str, T]] = {m: {} for m in modules}
    by_length = sorted(modules, key=len, reverse=True)
    for key, t in tensors.items():
        rest = key.removeprefix(KEY_PREFIX)
        module = next((m for m in by_length if rest.startswith(m + ".")), None) if key.startswith(KEY_PREFIX) else None
        if module is None:
            raise AdapterhubError(f"{where}: tensor '{key}' belongs to no module the manifest lists under base_quant")
        out[module][rest[len(module) + 1:]] = t
    empty = [m for m, bufs in out.items() if not bufs]
    if empty:
        raise AdapterhubError(f"{where}: no saved buffers for module(s) {empty[:3]} that the manifest lists")
    return out


@torch.no_grad()
def restore_base(base: nn.Module, saved: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``saved`` into the buffers of ``base`` (a :class:`QuantizedLinear`): the same names and
    shapes; integer buffers (codes) must keep their dtype, float ones (scales) are cast."""
    if not isinstance(base, QuantizedLinear):
        raise AdapterhubError(f"{where}: the base is a {type(base).__name__}, not a quantized layer, so the saved "
                              "quantized base cannot be restored into it")
    own = dict(base.named_buffers())
    if set(own) != set(saved):
        raise AdapterhubError(f"{where}: saved buffers {sorted(saved)} do not match the {base.quantizer} base's "
                              f"{sorted(own)}")
    for key, target in own.items():
        src = saved[key]
        if src.shape != target.shape:
            raise AdapterhubError(f"{where}: saved buffer '{key}' has shape {tuple(src.shape)}, the {base.quantizer} "
                                  f"base has {tuple(target.shape)}")
        if src.dtype != target.dtype and not (src.dtype.is_floating_point and target.dtype.is_floating_point):
            raise AdapterhubError(f"{where}: saved buffer '{key}' is {src.dtype}, the {base.quantizer} base holds "
                                  f"{target.dtype}")
        target.copy_(src.to(target.dtype))
