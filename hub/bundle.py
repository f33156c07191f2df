"""Bundles: a directory with the adapter tensors and a manifest.

    adapter_model.safetensors  adapter tensors, PEFT key names (``base_model.model.<module>.<tensor>``)
    adapterhub.json            format version, spec text, per-module variant/params/quant,
                               base-model fingerprint, parent version, metrics
    base_quant.safetensors     the quantized bases of variants that build their own (LoftQ, LQ-LoRA), as
                               ``base_quant.<module>.<buffer>``; the manifest's ``base_quant`` lists them
    adapter_config.json        PEFT's config, when PEFT can express the adapter (lora, rslora, dora,
                               per-module ranks, vera, ia3, on quantized bases too)
    README.md                  a model card (``library_name: peft`` when PEFT can load it)

Saving writes a temporary directory and renames it into place; loading reads safetensors and
JSON only (never pickle). ``load`` also reads a directory written by PEFT's ``save_pretrained``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapterhub.plugins._saved_base import FILE as BASE_FILE
from adapterhub.plugins._saved_base import KEY_PREFIX as BASE_PREFIX
from adapterhub.plugins._saved_base import base_state, read_saved_bases, restore_bases, restoring
from adapterhub.registry import AdapterhubError, get_registry

from .atomic import atomic_dir
from .peft_format import CONFIG, PeftDescription, config_json, describe, from_peft_keys, to_peft_keys
from .peft_read import base_changing_init, read_config, spec_from_config
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
        **({"task": model.__dict__["adapterhub_task"]} if "adapterhub_task" in model.__dict__ else {}),
    }


def _yaml_scalar(v: str) -> str:
    return v if re.fullmatch(r"[A-Za-z0-9][\w.\-/]*", v) else json.dumps(v)


def card(m: dict[str, Any], peft: PeftDescription | None = None) -> str:
    """The README.md model card: YAML front matter (``base_model``, ``library_name`` -- ``peft`` when
    PEFT can load the bundle, else ``adapterhub`` -- and tags), then how to load it, the spec and metrics."""
    variants = sorted({v["variant"] for v in m["modules"].values() if v["variant"]})
    peft_type = peft.peft_type if peft is not None else None
    tags = ["adapterhub", *variants]
    if peft_type:
        tags += [t for t in ("peft", peft_type.lower()) if t not in tags]
    base = m.get("base_model") or ""
    lines = ["---"]
    if base and not base.startswith(("/", ".", "~")):
        lines.append(f"base_model: {_yaml_scalar(base)}")
    lines += [f"library_name: {'peft' if peft_type else 'adapterhub'}", "tags:"]
    lines += [f"- {_yaml_scalar(t)}" for t in tags]
    lines += ["---", "", f"# Adapter for {base or 'an unnamed base model'}", "",
              f"Made with adapterhub {m['adapterhub_version']}: {m['trainable_params']:,} trainable parameters "
              f"in {len(m['modules'])} modules ({', '.join(variants) or 'no adapter variant'}).", "",
              "## Loading", "", "```python", "import adapterhub", "model = ...  # the base model",
              "adapterhub.load(model, \"path/to/this/bundle\")", "```", ""]
    if peft_type:
        lines += [f"PEFT loads it too ({peft_type}; `adapter_config.json`):", "", "```python",
                  "from peft import PeftModel",
                  "model = PeftModel.from_pretrained(base_model, \"path/to/this/bundle\")", "```", ""]
        lines += [f"Note: {n}." for n in peft.notes] + ([""] if peft.notes else [])
    elif peft is not None:
        lines += [f"There is no `adapter_config.json`: PEFT cannot load this adapter because {peft.reason}.", ""]
    lines += ["## Surgery spec", "", "```", m["spec"].rstrip(), "```", ""]
    if m["metrics"]:
        lines += ["## Metrics", ""] + [f"- {k}: {v}" for k, v in m["metrics"].items()] + [""]
    if m.get("parent"):
        lines += [f"Parent version: {m['parent']}", ""]
    return "\n".join(lines)


def save(model: nn.Module, directory: str | Path, *, metrics: dict[str, Any] | None = None,
         parent: str | None = None) -> Path:
    """Write the model's adapters to ``directory`` as a bundle (atomically; replaces an old one).

    Files: ``adapter_model.safetensors``, ``adapterhub.json``, ``README.md``, PEFT's
    ``adapter_config.json`` when the adapter is expressible in PEFT (see :mod:`adapterhub.peft_format`),
    and ``base_quant.safetensors`` when a variant built its own quantized base (LoftQ, LQ-LoRA): a
    separate file, so PEFT and every reader of ``adapter_model.safetensors`` never see it.
    """
    directory = Path(directory)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in adapter_state(model).items()}
    bases = {k: v.detach().to("cpu").contiguous().clone() for k, v in own_quantized_bases(model).items()}
    m = manifest(model, metrics, parent)
    if bases:
        m["base_quant"] = {"file": BASE_FILE, "modules": sorted({k.removeprefix(BASE_PREFIX).rsplit(".", 1)[0]
                                                                  for k in bases}),
                           "bytes": sum(t.numel() * t.element_size() for t in bases.values())}
    peft = describe(model, m["base_model"])
    if peft.config is not None:
        tensors = to_peft_keys(tensors, model)
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if bases:
            save_file(bases, str(tmp / BASE_FILE), metadata={"format": "pt"})
        (tmp / MANIFEST).write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        if peft.config is not None:
            (tmp / CONFIG).write_text(config_json(peft.config))
        (tmp / "README.md").write_text(card(m, peft))
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
    """Apply the bundle named by ``source`` to a fresh ``model`` and load its tensors; returns the model.

    ``source``: a bundle directory, a stored version (``name``, ``name@v3``, ``name@tag``) or a Hub
    repository (``hf://org/name@v2``), see :func:`adapterhub.sources.bundle_dir`. The bundle's
    base-model fingerprint must match ``model`` unless ``check_base=False``. A directory saved by PEFT
    (``adapter_config.json`` without ``adapterhub.json``) is translated into a spec and loaded too; it
    carries no fingerprint, so the base model cannot be checked (a warning says so).
    """
    from .fingerprint import model_fingerprint
    from .sources import bundle_dir

    directory = bundle_dir(source)
    if not (directory / MANIFEST).is_file() and (directory / CONFIG).is_file():
        return _load_peft(model, directory)
    m = read_manifest(directory)
    if "task" in m:  # a classifier (train_head): the head size must fit before anything else is compared
        from .train_head import check_task

        check_task(model, m["task"], source)
    if check_base and applied(model) is None:
        fp = model_fingerprint(model)
        if m.get("base_fingerprint") and fp != m["base_fingerprint"]:
            raise AdapterhubError(
                f"bundle '{source}' was made for another base model ({m.get('base_model')}, "
                f"{m['base_fingerprint'][:19]}...) than this one ({fp[:19]}...); pass check_base=False "
                "(--force on the CLI) to load it anyway")
    if applied(model) is None:
        bases = _saved_bases(model, directory, m)
        with restoring(frozenset(bases), {n: m["modules"][n].get("quant_params") or {} for n in bases}):
            apply(model, m["spec"], seed=m.get("seed", 0))
        restore_bases(dict(adapter_layers(model)), bases, f"bundle '{directory}'")
    _load_tensors(model, directory)
    if "task" in m:
        from .train_head import set_task

        set_task(model, m["task"])
    return model


def own_quantized_bases(model: nn.Module) -> dict[str, torch.Tensor]:
    """``base_quant.<module>.<buffer>`` -> buffer of every layer whose variant quantizes its own base
    (``owns_quantization``: LoftQ, LQ-LoRA), whose init cannot be re-run cheaply or bit-exactly."""
    registry = get_registry()
    return base_state([(n, layer) for n, layer in adapter_layers(model)
                       if getattr(registry.variants.get(layer.variant), "owns_quantization", False)])


def _saved_bases(model: nn.Module, directory: Path, m: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """The bundle's saved quantized bases (``{module: {buffer: tensor}}``); empty for a bundle without
    them (older ones: the variants re-run their init) or one made for another base structure
    (``check_base=False``: the init runs on this model's weights, as it always did)."""
    from .fingerprint import model_fingerprint

    if not m.get("base_quant") or (m.get("base_fingerprint") and model_fingerprint(model) != m["base_fingerprint"]):
        return {}
    return read_saved_bases(directory, m["base_quant"], set(m["modules"]))


def _load_peft(model: nn.Module, directory: Path) -> nn.Module:
    """Load an adapter saved by PEFT: its config becomes an adapterhub spec (``peft_format``)."""
    from adapterhub.dsl import parse

    if applied(model) is not None:
        raise AdapterhubError(f"'{directory}' is a PEFT adapter: load it into a fresh model (this one already "
                              "has adapters)")
    if not (directory / WEIGHTS).is_file() and (directory / "adapter_model.bin").is_file():
        raise AdapterhubError(f"'{directory}' holds adapter_model.bin (a pickle); adapterhub reads safetensors "
                              "only -- re-save it with PEFT's save_pretrained(safe_serialization=True)")
    config = read_config(directory)
    assert config is not None
    text = spec_from_config(config, model, str(directory))
    warnings.warn(f"'{directory}' was saved by PEFT and has no {MANIFEST}: there is no base-model fingerprint, "
                  f"so adapterhub cannot check that this base model (base_model_name_or_path: "
                  f"{config.get('base_model_name_or_path')!r}) is the one it was trained on", stacklevel=3)
    init = base_changing_init(config)
    if init:
        warnings.warn(f"'{directory}' was trained with init_lora_weights={init!r}, which changes the base weights "
                      "at initialisation: it is correct only on that changed base model (or convert it to a plain "
                      "LoRA with PEFT's path_initial_model_for_weight_conversion)", stacklevel=3)
    apply(model, parse(text, filename=f"{directory}/{CONFIG}"), seed=0)
    _load_tensors(model, directory, peft=True)
    return model


def _peft_base_tensors(model: nn.Module, keys: set[str]) -> dict[str, torch.Tensor]:
    """Base-layer tensors a PEFT checkpoint carries (``save_embedding_layers``: an adapted embedding's
    full weight, e.g. after resizing the vocabulary); PEFT loads them into the base, and so do we."""
    layers = dict(adapter_layers(model))
    out = {}
    for key in keys:
        module, sep, rest = key.removeprefix(PREFIX).partition(".base_layer.")
        if sep and module in layers and not layers[module].attached:
            params = dict(layers[module].base_layer.named_parameters())
            if rest in params:
                out[key] = params[rest]
    return out


def _load_tensors(model: nn.Module, directory: Path, peft: bool = False) -> None:
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise AdapterhubError(f"bundle '{directory}' has no {WEIGHTS}")
    try:
        tensors = load_file(str(weights))
    except Exception as exc:
        raise AdapterhubError(f"cannot read {weights}: {exc}") from None
    expected = adapter_state(model)
    tensors = from_peft_keys(tensors, set(expected))
    if peft:
        expected.update(_peft_base_tensors(model, set(tensors) - set(expected)))
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
