"""Rebuilding a bundle's adapter layers around given base modules (not a whole ``apply``).

:func:`bundle_entries` reads what a bundle does to each module (its manifest, or a PEFT directory's
config translated to a spec), :func:`wrap_entries` builds the layers with each variant's ``wrap``
in ``apply``'s order under the bundle's seed (so shared tensors -- VeRA's projection, Tied-LoRA's
factors -- are owned by the same layer as when the bundle was saved), :func:`load_layer_tensors`
loads the bundle's tensors into them one at a time. Stacking (:mod:`adapterhub.stacking`), compose and
the streaming merge (:mod:`adapterhub.merge_stream`, on placeholder bases) build on these.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterhub.registry import (
    AdapterhubError,
    AdapterLayer,
    ApplyContext,
    QuantizedLinear,
    Registry,
    bind,
    get_registry,
)

PREFIX = "base_model.model."


@dataclass(frozen=True)
class Entry:
    """What a bundle does to one module (the manifest's ``modules`` item)."""

    module: str
    action: str  # variant | train | freeze
    variant: str | None
    params: dict[str, Any] = field(default_factory=dict)
    quant: str | None = None
    quant_params: dict[str, Any] = field(default_factory=dict)


@dataclass
class BundleInfo:
    """A bundle read for rebuilding: its directory, entries in the model's module order, seed, manifest."""

    source: str
    directory: Path
    entries: list[Entry]
    seed: int
    manifest: dict[str, Any] | None  # None for a directory saved by PEFT


def bundle_entries(source: str | os.PathLike, model: nn.Module, directory: Path | None = None) -> BundleInfo:
    """Read the bundle named by ``source`` (a directory, ``name@v3``, ``hf://...``; see
    :func:`adapterhub.sources.bundle_dir`; ``directory`` if already resolved) against ``model`` (an
    un-adapted live or meta model)."""
    from .bundle import MANIFEST, read_manifest
    from .peft_format import CONFIG
    from .peft_read import read_config
    from .sources import bundle_dir

    directory = directory or bundle_dir(source)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    if not (directory / MANIFEST).is_file() and (directory / CONFIG).is_file():
        from .peft_read import spec_from_config
        from .planning import plan

        config = read_config(directory)
        assert config is not None
        p = plan(model, spec_from_config(config, model, str(directory)))
        entries = [Entry(e.module, e.action, e.variant, dict(e.params), e.quant, dict(e.quant_params))
                   for e in p.entries if e.action != "skip"]
        return BundleInfo(str(source), directory, entries, 0, None)
    m = read_manifest(directory)
    missing = sorted(n for n in m["modules"] if n not in order)
    if missing:
        raise AdapterhubError(f"bundle '{source}' adapts modules this model does not have: {missing[:3]} "
                              f"({len(missing)} in all); is it for another base model?")
    entries = [Entry(n, e["action"], e.get("variant"), dict(e.get("params") or {}), e.get("quant"),
                     dict(e.get("quant_params") or {}))
               for n, e in sorted(m["modules"].items(), key=lambda kv: order[kv[0]]) if e["action"] != "skip"]
    return BundleInfo(str(source), directory, entries, int(m.get("seed", 0)), m)


def check_fingerprint(info: BundleInfo, model: nn.Module, fingerprint: str | None = None) -> None:
    """Refuse a bundle made for another base model (its manifest's fingerprint differs)."""
    from .fingerprint import model_fingerprint

    want = (info.manifest or {}).get("base_fingerprint")
    if not want:
        return
    got = fingerprint or model_fingerprint(model)
    if got != want:
        raise AdapterhubError(f"bundle '{info.source}' was made for another base model "
                              f"({info.manifest.get('base_model')}, {want[:19]}...) than this one ({got[:19]}...); "
                              "pass check_base=False (--force on the CLI) to use it anyway")


def refuse_unstackable(info: BundleInfo, registry: Registry, what: str) -> None:
    """Attached variants, container targets, ``train`` rules and jointly-quantizing variants cannot be
    rebuilt around a shared base module: say which, by name."""
    for e in info.entries:
        if e.action == "train":
            raise AdapterhubError(f"cannot {what} '{info.source}': module '{e.module}' is a `train` rule "
                                  "(modules_to_save), a full copy of the module rather than an adapter")
        if e.action != "variant":
            continue
        variant = registry.variants.get(e.variant or "")
        if variant is None:
            raise AdapterhubError(f"bundle '{info.source}' uses variant '{e.variant}', which is not installed")
        if variant.attach or not (set(variant.kinds) & {"linear", "conv1d", "embedding"}):
            raise AdapterhubError(f"cannot {what} '{info.source}': {e.variant} adapters (module '{e.module}') sit "
                                  "beside whole blocks rather than on one linear/conv1d/embedding module")
        if variant.owns_quantization and e.quant:
            raise AdapterhubError(f"cannot {what} '{info.source}': {e.variant} (module '{e.module}') builds its own "
                                  f"quantized base from the full-precision weight, so it cannot share a base")


def wrap_entries(bases: Mapping[str, nn.Module], entries: Sequence[Entry], seed: int,
                 registry: Registry | None = None, model: nn.Module | None = None,
                 retry_base: Callable[[Entry], nn.Module] | None = None) -> dict[str, AdapterLayer]:
    """Adapter layers for the ``variant`` entries, each built by its variant's ``wrap`` around
    ``bases[module]``, in ``apply``'s order (deepest first) under ``seed``, sharing one
    :class:`ApplyContext` -- so shared tensors (VeRA, Tied-LoRA) are owned as ``apply`` owns them.
    When ``wrap`` refuses a base and ``retry_base`` is given, it is tried once more on ``retry_base(entry)``."""
    registry = registry or get_registry()
    ctx = ApplyContext(model=model, seed=seed)
    layers: dict[str, AdapterLayer] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for e in reversed(entries):
            if e.action != "variant":
                continue
            variant = registry.variants[e.variant]
            params = bind(variant.Params, e.params, owner=variant.name)
            try:
                layer = variant.wrap(bases[e.module], params, ctx, e.module)
            except AdapterhubError:
                if retry_base is None:
                    raise
                layer = variant.wrap(retry_base(e), params, ctx, e.module)
            if not isinstance(layer, AdapterLayer):
                raise AdapterhubError(f"variant {variant.name} returned {type(layer).__name__}, not an AdapterLayer")
            layers[e.module] = layer
    return dict(reversed(list(layers.items())))


def load_layer_tensors(layers: Mapping[str, AdapterLayer], directory: Path, source: str,
                       ignore_modules: Iterable[str] = ()) -> None:
    """Copy the bundle's tensors into ``layers`` (read one tensor at a time), checking that they fit."""
    from safetensors import safe_open

    from .bundle import WEIGHTS
    from .peft_format import from_peft_keys

    expected = {f"{PREFIX}{name}.{k}": t for name, layer in layers.items()
                for k, t in layer.adapter_state_dict().items()}
    path = directory / WEIGHTS
    if not path.is_file():
        raise AdapterhubError(f"bundle '{source}' has no {WEIGHTS}")
    ignored = tuple(f"{PREFIX}{m}." for m in ignore_modules)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = [k for k in f.keys() if not k.startswith(ignored)]
            names = from_peft_keys({k: k for k in keys}, set(expected))  # our key -> key in the file
            missing = sorted(set(expected) - set(names))
            unexpected = sorted(set(names) - set(expected))
            if missing or unexpected:
                raise AdapterhubError(f"bundle '{source}' does not fit: {len(missing)} missing tensors {missing[:3]}, "
                                      f"{len(unexpected)} unexpected {unexpected[:3]}")
            with torch.no_grad():
                for key, target in expected.items():
                    src = f.get_tensor(names[key])
                    if src.shape != target.shape:
                        raise AdapterhubError(f"bundle '{source}': tensor {key} has shape {tuple(src.shape)}, "
                                              f"the adapter layer expects {tuple(target.shape)}")
                    target.copy_(src.to(target.dtype))
    except AdapterhubError:
        raise
    except Exception as exc:
        raise AdapterhubError(f"cannot read {path}: {exc}") from None


def quantize_module(module: nn.Module, entry: Entry, registry: Registry) -> nn.Module:
    """``module`` quantized as the entry's ``on QUANT`` clause says (itself when there is none)."""
    if not entry.quant or isinstance(module, QuantizedLinear):
        return module
    quantizer = registry.quantizers[entry.quant]
    return quantizer.quantize(module, bind(quantizer.Params, entry.quant_params, owner=quantizer.name))


def _quant_label(e: Entry) -> str:
    if not e.quant:
        return "not quantized"
    args = ", ".join(f"{k}={v}" for k, v in sorted(e.quant_params.items()))
    return f"{e.quant}({args})"


def common_quant(infos: Sequence[BundleInfo], what: str) -> dict[str, tuple[Entry, str]]:
    """``{module: (entry, source)}`` over all bundles; refuses a module the bundles quantize differently
    (their adapters were made on different base weights)."""
    out: dict[str, tuple[Entry, str]] = {}
    for info in infos:
        for e in info.entries:
            seen, src = out.setdefault(e.module, (e, info.source))
            if _quant_label(seen) != _quant_label(e):
                raise AdapterhubError(f"cannot {what}: '{src}' and '{info.source}' quantize module '{e.module}' "
                                      f"differently ({_quant_label(seen)} vs {_quant_label(e)}); their adapters "
                                      "were made on different base weights")
    return out
