"""Bundles: a directory with the adapter tensors and a manifest.

    adapter_model.safetensors  adapter tensors, PEFT key names (``base_model.model.<module>.<tensor>``)
    adapterhub.json            format version, spec text, per-module variant/params/quant,
                               base-model fingerprint, parent version, metrics
    README.md                  a model card

Saving writes a temporary directory and renames it into place; loading reads safetensors and
JSON only (never pickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapterhub.registry import AdapterhubError

from .atomic import atomic_dir
from .surgery import adapter_layers, applied, apply

FORMAT = "adapterhub.bundle"
FORMAT_VERSION = 1
WEIGHTS = "adapter_model.safetensors"
MANIFEST = "adapterhub.json"
PREFIX = "base_model.model."


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor and every ``train`` module's tensor, under PEFT's key names."""
    state_info = applied(model)
    if state_info is None:
        raise AdapterhubError("this model has no adapters: call adapterhub.apply(model, spec) first")
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(model):
        for key, t in layer.adapter_state_dict().items():
            out[f"{PREFIX}{name}.{key}"] = t
    for e in state_info.plan.entries:
        if e.action == "train":
            for key, t in model.get_submodule(e.module).state_dict().items():
                out[f"{PREFIX}{e.module}.{key}"] = t
    return out


def manifest(model: nn.Module, metrics: dict[str, Any] | None = None, parent: str | None = None) -> dict[str, Any]:
    from adapterhub import __version__

    info = applied(model)
    assert info is not None
    plan = info.plan
    cfg = getattr(model, "config", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapterhub_version": __version__,
        "spec": plan.spec.source,
        "spec_filename": plan.spec.filename,
        "base_model": plan.spec.base or getattr(cfg, "_name_or_path", None) or plan.model,
        "base_fingerprint": info.fingerprint,
        "seed": info.seed,
        "modules": {e.module: {"action": e.action, "variant": e.variant, "params": e.params,
                               "quant": e.quant, "quant_params": e.quant_params}
                    for e in plan.entries if e.action != "skip"},
        "trainable_params": plan.trainable,
        "parent": parent,
        "metrics": dict(metrics or {}),
    }


def _card(m: dict[str, Any]) -> str:
    variants = sorted({v["variant"] for v in m["modules"].values() if v["variant"]})
    tags = ["adapterhub", *variants]
    lines = ["---", f"base_model: {m['base_model']}", "library_name: adapterhub", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", f"# Adapter for {m['base_model']}", "",
              f"Made with adapterhub {m['adapterhub_version']}: {m['trainable_params']:,} trainable parameters "
              f"in {len(m['modules'])} modules.", "", "## Surgery spec", "", "```", m["spec"].rstrip(), "```", ""]
    if m["metrics"]:
        lines += ["## Metrics", ""] + [f"- {k}: {v}" for k, v in m["metrics"].items()] + [""]
    return "\n".join(lines)


def save(model: nn.Module, directory: str | Path, *, metrics: dict[str, Any] | None = None,
         parent: str | None = None) -> Path:
    """Write the model's adapters to ``directory`` as a bundle (atomically; replaces an old one)."""
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state(model).items()}
    m = manifest(model, metrics, parent)
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_card(m))
    return directory


def read_manifest(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise AdapterhubError(f"'{directory}' is not an adapterhub bundle: {MANIFEST} is missing")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterhubError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise AdapterhubError(f"{path} is not an adapterhub manifest (format != {FORMAT!r})")
    if m.get("format_version", 0) > FORMAT_VERSION:
        raise AdapterhubError(f"{path} has format version {m['format_version']}; this adapterhub reads up to "
                              f"{FORMAT_VERSION} -- upgrade adapterhub")
    return m


def load(model: nn.Module, source: str | Path, *, check_base: bool = True) -> nn.Module:
    """Apply the bundle at ``source`` to a fresh ``model`` and load its tensors; returns the model.

    The bundle's base-model fingerprint must match ``model`` unless ``check_base=False``.
    """
    from .fingerprint import model_fingerprint

    directory = Path(source)
    m = read_manifest(directory)
    if check_base and applied(model) is None:
        fp = model_fingerprint(model)
        if m.get("base_fingerprint") and fp != m["base_fingerprint"]:
            raise AdapterhubError(
                f"bundle '{directory}' was made for another base model ({m.get('base_model')}, "
                f"{m['base_fingerprint'][:19]}...) than this one ({fp[:19]}...); pass check_base=False "
                "(--force on the CLI) to load it anyway")
    if applied(model) is None:
        apply(model, m["spec"], seed=m.get("seed", 0))
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise AdapterhubError(f"bundle '{directory}' has no {WEIGHTS}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise AdapterhubError(f"cannot read {weights}: {exc}") from None
    expected = adapter_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterhubError(
            f"bundle '{directory}' does not fit this model: {len(missing)} missing tensors "
            f"{missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}")
    with torch.no_grad():
        for key, target in expected.items():
            src = tensors[key]
            if src.shape != target.shape:
                raise AdapterhubError(f"bundle '{directory}': tensor {key} has shape {tuple(src.shape)}, "
                                      f"the model expects {tuple(target.shape)}")
            target.copy_(src.to(target.dtype))
    return model
