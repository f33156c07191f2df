"""PEFT's adapter format: ``adapter_config.json`` written from an adapted model, and read back as a spec.

Writing (:func:`describe`): an adapted model is expressible in PEFT when every adapter rule uses one
PEFT method --

* ``lora`` / ``lora_fa`` (LoRA-FA differs only in training) → ``LoraConfig``; ``rslora`` →
  ``use_rslora``; per-module ranks and alphas → ``rank_pattern`` / ``alpha_pattern``;
* ``dora`` → ``LoraConfig(use_dora=True)``;
* ``vera`` (one shared projection: same ``r``, ``seed``, ``save_projection``) → ``VeraConfig``
  (``projection_prng_key = seed``, ``d_initial = d_init``);
* ``ia3`` → ``IA3Config`` (``feedforward=true`` modules → ``feedforward_modules``)

-- on any base, quantized ones included (PEFT's QLoRA loads the same LoRA config on a
bitsandbytes base). ``train`` rules become ``modules_to_save``. Anything else (mixed methods,
variants PEFT lacks) has no ``adapter_config.json``; :func:`describe` says why.

``task_type`` comes from the task the model was trained for (the ``"task"`` record of a bundle's
``adapterhub.json``, :mod:`adapterhub.train_head`) through :data:`PEFT_TASK_TYPES`: a sequence classifier
gets ``"SEQ_CLS"`` (PEFT then loads it as ``PeftModelForSequenceClassification``, which adds ``classifier``
and ``score`` to ``modules_to_save``); without a record it stays null (nothing is guessed from the model).
When PEFT's task model would resolve the config differently (a frozen or adapted head), it stays null too
and a note says why.

``target_modules`` is a list of leaf names (``q_proj``) where a leaf name selects exactly the
adapted modules of the model, else full module names. The written config is checked by resolving
it back with the reader's PEFT matching rules before it is used.

Reading (:mod:`adapterhub.peft_read`, ``spec_from_config``): PEFT's matching is reproduced (``peft.tuners.tuners_utils.
check_target_module_exists``: ``exclude_modules``, ``modules_to_save`` exclusion, a ``str`` target is
``re.fullmatch``, a list matches exactly or as a dotted suffix, ``layers_to_transform`` /
``layers_pattern``; ``"all-linear"``; ``rank_pattern``/``alpha_pattern`` first match in dict order,
``re.match(rf"(.*\\.)?({key})$")``) on the live model, and the result is written as an adapterhub
spec with one rule per group of modules with the same parameters. Options that only affect
initialisation or training (``init_lora_weights``, ``loftq_config``, dropout, ...) are kept where
adapterhub has them and otherwise ignored; options that change the forward and that adapterhub
lacks (``bias != "none"``, ``lora_bias``, ``layer_replication``, ...) are refused by name.

Tensor names are PEFT's in both formats except VeRA's shared projection: adapterhub keeps it under
the layer that owns it (``base_model.model.<module>.vera_A``), PEFT at ``base_model.vera_A`` /
``base_model.vera_B`` (the adapter name ``default`` stripped); :func:`to_peft_keys` and
:func:`from_peft_keys` rename it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterhub.registry import AdapterhubError, AdapterLayer, module_kind

CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
VERA_KEYS = ("vera_A", "vera_B")

#: Every key of ``LoraConfig(...).to_dict()`` in PEFT 0.21.2, with its default (``peft_version`` is
#: left out: it names the PEFT that wrote the file, and none did).
LORA_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "qalora_group_size": 16, "r": 8, "rank_pattern": {},
    "revision": None, "target_modules": None, "target_parameters": None, "task_type": None,
    "trainable_token_indices": None, "use_bdlora": None, "use_dora": False, "use_qalora": False,
    "use_rslora": False, "velora_config": None,
}
VERA_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None, "base_model_name_or_path": None, "bias": "none", "d_initial": 0.1,
    "fan_in_fan_out": False, "inference_mode": True, "init_weights": True, "layers_pattern": None,
    "layers_to_transform": None, "modules_to_save": None, "peft_type": "VERA", "projection_prng_key": 0,
    "r": 256, "revision": None, "save_projection": True, "target_modules": None, "task_type": None,
    "vera_dropout": 0.0,
}
IA3_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None, "fan_in_fan_out": False,
    "feedforward_modules": None, "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None,
    "peft_type": "IA3", "revision": None, "target_modules": None, "task_type": None,
}
#: adapterhub's task record (``"task"["type"]`` in ``adapterhub.json``) → PEFT's ``task_type``.
PEFT_TASK_TYPES: dict[str, str] = {"sequence-classification": "SEQ_CLS"}


def peft_task_type(task: Any) -> str | None:
    """PEFT's ``task_type`` for an adapterhub task record (None: no record, or a task PEFT has no type for)."""
    return PEFT_TASK_TYPES.get(task.get("type")) if isinstance(task, dict) else None


@dataclass
class PeftDescription:
    """What :func:`describe` found: PEFT's config, or why there is none."""

    config: dict[str, Any] | None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peft_type(self) -> str | None:
        return self.config["peft_type"] if self.config else None


# --------------------------------------------------------------------------- model names


def base_module_names(model: nn.Module) -> list[str]:
    """Module names as the un-adapted model has them (adapter internals and attached adapters left out)."""
    names: list[str] = []
    skip: str | None = None
    for name, mod in model.named_modules():
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        skip = None
        if isinstance(mod, AdapterLayer):
            skip = name
            if mod.attached:
                continue
        names.append(name)
    return names


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def target_list(targets: list[str], names: list[str]) -> list[str]:
    """``target_modules`` for PEFT: leaf names that select exactly ``targets`` among ``names``
    (exact or dotted-suffix match), full names for the rest."""
    wanted = set(targets)
    by_leaf: dict[str, list[str]] = {}
    for t in targets:
        by_leaf.setdefault(_leaf(t), []).append(t)
    out: list[str] = []
    for leaf, members in by_leaf.items():
        hits = [n for n in names if n == leaf or n.endswith("." + leaf)]
        out.extend([leaf] if set(hits) <= wanted else members)
    return sorted(out)


def pattern_keys(values: dict[str, Any], default: Any) -> dict[str, Any]:
    """``rank_pattern``/``alpha_pattern``: per module value where it differs from ``default``; a leaf
    name when all modules with that leaf name agree, else the module's escaped full name (first)."""
    by_leaf: dict[str, list[str]] = {}
    for name in values:
        by_leaf.setdefault(_leaf(name), []).append(name)
    full: dict[str, Any] = {}
    short: dict[str, Any] = {}
    for leaf, members in by_leaf.items():
        distinct = {values[m] for m in members}
        if len(distinct) == 1:
            v = distinct.pop()
            if v != default:
                short[re.escape(leaf)] = v
        else:
            full.update({re.escape(m): values[m] for m in members if values[m] != default})
    return {**full, **short}


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else float(v)


def auto_mapping(model: nn.Module) -> dict[str, str] | None:
    cls = type(model)
    if not cls.__module__.startswith("transformers."):
        return None
    return {"base_model_class": cls.__name__, "parent_library": cls.__module__}


# --------------------------------------------------------------------------- writing


def describe(model: nn.Module, base_model: str | None = None) -> PeftDescription:
    """PEFT's ``adapter_config.json`` content for an adapted model, or why it has none."""
    from .surgery import applied
    from .train_head import task_of

    info = applied(model)
    if info is None:
        raise AdapterhubError("this model has no adapters: call adapterhub.apply(model, spec) first")
    entries = [e for e in info.plan.entries if e.action == "variant"]
    train = [e.module for e in info.plan.entries if e.action == "train"]
    variants = sorted({e.variant for e in entries})
    if not entries:
        return PeftDescription(None, "the spec has no adapter rules (only train/freeze), and PEFT needs a method")
    family = {"lora": "lora", "lora_fa": "lora", "dora": "dora", "vera": "vera", "ia3": "ia3"}
    methods = {family.get(v) for v in variants}
    if None in methods:
        lacking = sorted(v for v in variants if v not in family)
        return PeftDescription(None, f"PEFT has no equivalent of {', '.join(lacking)} (PEFT-loadable here: lora, "
                                     "lora_fa, dora, vera, ia3)")
    if len(methods) > 1:
        return PeftDescription(None, f"it mixes {', '.join(variants)}; one PEFT config holds one method")
    layers = {e.module: model.get_submodule(e.module) for e in entries}
    names = base_module_names(model)
    targets = [e.module for e in entries]
    task_type = peft_task_type(task_of(model))
    common: dict[str, Any] = {  # PEFT writes auto_mapping only without a task type (AutoPeftModel's fallback)
        "auto_mapping": None if task_type else auto_mapping(model), "base_model_name_or_path": base_model,
        "modules_to_save": sorted(train) or None, "task_type": task_type,
        "target_modules": target_list(targets, names),
        "fan_in_fan_out": any(module_kind(layer.base_layer) == "conv1d" for layer in layers.values()),
    }
    method = methods.pop()
    notes = []
    quants = sorted({e.quant for e in entries if e.quant})
    if quants:
        notes.append(f"the adapter was trained on a base quantized with {', '.join(quants)}; for the closest "
                     "outputs load the base the same way (e.g. bitsandbytes 4-bit for nf4/fp4)")
    if method in ("lora", "dora"):
        config, why = _lora_config(entries, common, use_dora=method == "dora")
    elif method == "vera":
        config, why = _vera_config(entries, common)
    else:
        config, why = _ia3_config(entries, common)
    if config is None:
        return PeftDescription(None, why)
    why = _mismatch(config, model, names, entries, train)
    if why is not None and config["task_type"] is not None:
        untyped = {**config, "task_type": None, "auto_mapping": auto_mapping(model)}
        if _mismatch(untyped, model, names, entries, train) is None:
            from .peft_read import TASK_HEADS

            heads = "/".join(f"'{h}'" for h in TASK_HEADS.get(config["task_type"], ((), False))[0])
            notes.append(f"task_type is null, not {config['task_type']}: PEFT's task model would then also treat "
                         f"{heads or 'its head'} as modules_to_save, which this adapter does not (a frozen or "
                         "adapted head)")
            config, why = untyped, None
    if why is not None:
        return PeftDescription(None, why)
    return PeftDescription(config, None, notes)


def _mismatch(config: dict[str, Any], model: nn.Module, names: list[str], entries: list,
              train: list[str]) -> str | None:
    """Why PEFT, resolving ``config`` on ``model``, would not adapt exactly ``entries`` and train exactly
    ``train`` (None: it would)."""
    from .peft_read import resolve_peft  # the reader checks what the writer wrote

    try:
        check = resolve_peft(config, model, names)
    except AdapterhubError as exc:
        return f"PEFT could not resolve the config written for it ({exc})"
    expected = {e.module: (e.variant if e.variant != "lora_fa" else "lora", _comparable(e.variant, e.params))
                for e in entries}
    got = {m: (v, _comparable(v, p)) for m, (v, p) in check.variants.items()}
    if got != expected or sorted(check.train) != sorted(train):
        return "PEFT's target matching cannot express exactly these modules"
    return None


def _comparable(variant: str, params: dict[str, Any]) -> tuple:
    """The parameters that change the adapted forward, with defaults filled in."""
    keys = {"lora": {"r": 8, "alpha": 8.0, "rslora": False}, "vera": {"r": 256, "seed": 0, "save_projection": True},
            "ia3": {"feedforward": False}}[{"lora_fa": "lora", "dora": "lora"}.get(variant, variant)]
    values = (params.get(k, d) for k, d in keys.items())
    return tuple(float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in values)


def _lora_config(entries: list, common: dict[str, Any], use_dora: bool) -> tuple[dict | None, str | None]:
    rslora = {bool(e.params.get("rslora", False)) for e in entries}
    if len(rslora) > 1:
        return None, "some rules use rslora and some do not; PEFT's use_rslora holds for the whole adapter"
    ranks = {e.module: int(e.params["r"]) for e in entries}
    alphas = {e.module: _number(e.params["alpha"]) for e in entries}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropout = Counter(float(e.params.get("dropout", 0.0)) for e in entries).most_common(1)[0][0]
    gaussian = all(e.params.get("init") == "gaussian" for e in entries)
    config = {**LORA_DEFAULTS, **common, "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
              "use_rslora": rslora.pop(), "use_dora": use_dora, "rank_pattern": pattern_keys(ranks, r),
              "alpha_pattern": pattern_keys(alphas, alpha), "init_lora_weights": "gaussian" if gaussian else True}
    return config, None


def _vera_config(entries: list, common: dict[str, Any]) -> tuple[dict | None, str | None]:
    shared = {(e.params["r"], e.params["seed"], e.params["save_projection"]) for e in entries}
    if len(shared) > 1:
        return None, "its vera rules use different r/seed/save_projection; PEFT shares one projection per adapter"
    r, seed, save = shared.pop()
    d_init = Counter(float(e.params["d_init"]) for e in entries).most_common(1)[0][0]
    return {**VERA_DEFAULTS, **common, "r": int(r), "projection_prng_key": int(seed), "save_projection": bool(save),
            "d_initial": d_init}, None


def _ia3_config(entries: list, common: dict[str, Any]) -> tuple[dict | None, str | None]:
    ff = [e.module for e in entries if e.params.get("feedforward")]
    targets = [e.module for e in entries]
    # PEFT tests feedforward modules with a plain ``key.endswith(x)`` among the targets
    by_leaf: dict[str, list[str]] = {}
    for m in ff:
        by_leaf.setdefault(_leaf(m), []).append(m)
    ff_list: list[str] = []
    for leaf, members in by_leaf.items():
        hits = {t for t in targets if t.endswith(leaf)}
        ff_list.extend([leaf] if hits <= set(ff) else members)
    if not set(ff_list) <= set(common["target_modules"]):  # PEFT requires feedforward ⊆ target entries
        common = {**common, "target_modules": sorted(targets)}
        ff_list = ff
    return {**IA3_DEFAULTS, **common, "feedforward_modules": sorted(ff_list)}, None


def config_json(config: dict[str, Any]) -> str:
    """As PEFT writes it: ``json.dumps(indent=2, sort_keys=True)``."""
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def _vera_owner(model: nn.Module) -> str | None:
    for name, mod in model.named_modules():
        if getattr(mod, "variant", None) == "vera" and getattr(mod, "owns_projection", False):
            return name
    return None


def to_peft_keys(tensors: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """adapterhub's tensor names → PEFT's (only VeRA's shared projection moves to ``base_model.vera_A``)."""
    owner = _vera_owner(model)
    if owner is None:
        return dict(tensors)
    out = {}
    for k, v in tensors.items():
        for t in VERA_KEYS:
            if k == f"{PREFIX}{owner}.{t}":
                k = f"base_model.{t}"
        out[k] = v
    return out


def from_peft_keys(tensors: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """PEFT's ``base_model.vera_A``/``vera_B`` → the owning layer's key among ``expected``."""
    out = dict(tensors)
    for t in VERA_KEYS:
        key = f"base_model.{t}"
        if key in out:
            owners = [k for k in expected if k.endswith(f".{t}")]
            if len(owners) == 1:
                out[owners[0]] = out.pop(key)
    return out

