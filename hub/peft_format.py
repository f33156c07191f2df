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

``target_modules`` is a list of leaf names (``q_proj``) where a leaf name selects exactly the
adapted modules of the model, else full module names. The written config is checked by resolving
it back with the reader's PEFT matching rules before it is used.

Reading (:func:`spec_from_config`): PEFT's matching is reproduced (``peft.tuners.tuners_utils.
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
from pathlib import Path
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
#: LoRA options that change the adapted forward and that adapterhub's variants do not have.
_LORA_UNSUPPORTED = ("alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication",
                     "megatron_config", "monteclora_config", "target_parameters", "trainable_token_indices",
                     "use_bdlora", "velora_config")


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
    common: dict[str, Any] = {
        "auto_mapping": auto_mapping(model), "base_model_name_or_path": base_model,
        "modules_to_save": sorted(train) or None,
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
    try:
        check = resolve_peft(config, model, names)
    except AdapterhubError as exc:
        return PeftDescription(None, f"PEFT could not resolve the config written for it ({exc})")
    expected = {e.module: (e.variant if e.variant != "lora_fa" else "lora", _comparable(e.variant, e.params))
                for e in entries}
    got = {m: (v, _comparable(v, p)) for m, (v, p) in check.variants.items()}
    if got != expected or sorted(check.train) != sorted(train):
        return PeftDescription(None, "PEFT's target matching cannot express exactly these modules")
    return PeftDescription(config, None, notes)


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


# --------------------------------------------------------------------------- reading


def read_config(directory: str | Path) -> dict[str, Any] | None:
    """``adapter_config.json`` of ``directory`` as a dict, or None if there is none."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterhubError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterhubError(f"{path} is not a PEFT adapter config (no peft_type)")
    return config


@dataclass
class PeftResolution:
    """A PEFT config resolved on a model: ``{module: (variant, params)}`` and the ``train`` modules."""

    variants: dict[str, tuple[str, dict[str, Any]]]
    train: list[str]


def _matches_target(config: dict[str, Any], key: str) -> bool:
    """PEFT's ``check_target_module_exists`` (peft 0.21.2) on one module name."""
    exclude = config.get("exclude_modules")
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{x}") for x in exclude):
            return False
    for m in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){m}($|\..*)", key):
            return False
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{t}") for t in targets):
        return False
    indexes = config.get("layers_to_transform")
    if indexes is None or (isinstance(indexes, list) and not indexes):
        return True
    pattern = config.get("layers_pattern")
    match = None
    if not pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for p in [pattern] if isinstance(pattern, str) else pattern:
            match = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == indexes if isinstance(indexes, int) else idx in indexes


def _pattern_value(patterns: dict[str, Any], key: str, default: Any) -> Any:
    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", key):
            return patterns[p]
    return default


def _all_linear(model: nn.Module, names: list[str]) -> list[str]:
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = []
    for n in names:
        mod = model.get_submodule(n) if n else model
        if module_kind(mod) in ("linear", "conv1d") and mod is not out_emb:
            out.append(n)
    return out


def _default_targets(config: dict[str, Any], model: nn.Module) -> list[str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    try:
        from peft.utils import constants
    except ImportError:
        constants = None
    table = {"LORA": "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
             "VERA": "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING",
             "IA3": "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING"}
    mapping = getattr(constants, table[config["peft_type"]], {}) if constants is not None else {}
    if model_type not in mapping:
        raise AdapterhubError(f"the PEFT config has no target_modules and no default is known for model type "
                              f"{model_type!r}")
    return list(mapping[model_type])


def resolve_peft(config: dict[str, Any], model: nn.Module, names: list[str] | None = None) -> PeftResolution:
    """Which modules of ``model`` a PEFT config adapts, with what adapterhub variant and parameters."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "VERA", "IA3"):
        raise AdapterhubError(f"PEFT adapter type {peft_type or '?'} has no adapterhub equivalent "
                              "(adapterhub reads LORA, VERA and IA3 configs)")
    config = {**config, "peft_type": peft_type}
    names = base_module_names(model) if names is None else names
    _refuse_unsupported(config, peft_type)
    if config.get("target_modules") is None:
        config["target_modules"] = _default_targets(config, model)
    if isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear":
        config["target_modules"] = _all_linear(model, names)
    save = config.get("modules_to_save") or []
    train: list[str] = []
    for n in names:
        if n and any(n.endswith(m) for m in save) and not any(n.startswith(t + ".") for t in train):
            train.append(n)
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for n in names:
        if n and _matches_target(config, n):
            variants[n] = _variant_for(config, peft_type, n)
            mod = model.get_submodule(n)
            mod = mod.base_layer if isinstance(mod, AdapterLayer) else mod
            allowed = _KINDS[variants[n][0]]
            if module_kind(mod) not in allowed:
                raise AdapterhubError(f"the PEFT config targets '{n}' ({type(mod).__name__}), which adapterhub's "
                                      f"{variants[n][0]} cannot adapt (it adapts: {', '.join(sorted(allowed))})")
    if not variants:
        raise AdapterhubError(f"the PEFT config's target_modules {config['target_modules']!r} match no module of "
                              "this model")
    return PeftResolution(variants, train)


_KINDS = {"lora": frozenset({"linear", "conv1d", "embedding"}), "dora": frozenset({"linear", "conv1d"}),
          "vera": frozenset({"linear", "conv1d"}), "ia3": frozenset({"linear", "conv1d"})}
#: LoRA initialisations after which PEFT's adapter belongs to a changed base model.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


def base_changing_init(config: dict[str, Any]) -> str | None:
    """The ``init_lora_weights`` value when it changed the base weights (PiSSA, OLoRA, CorDA, LoftQ)."""
    init = config.get("init_lora_weights")
    return init if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS) else None


def _refuse_unsupported(config: dict[str, Any], peft_type: str) -> None:
    if config.get("bias", "none") != "none":
        raise AdapterhubError(f"PEFT adapter with bias={config['bias']!r} trains the base biases; adapterhub "
                              "reads only bias='none' adapters")
    if peft_type != "LORA":
        return
    if config.get("lora_bias"):
        raise AdapterhubError("PEFT adapter with lora_bias=true (a bias on lora_B) has no adapterhub variant; "
                              "load it with PEFT")
    if config.get("use_qalora"):
        raise AdapterhubError("PEFT adapter with use_qalora=true (GPTQ QA-LoRA) cannot be read by adapterhub")
    for key in _LORA_UNSUPPORTED:
        if config.get(key) not in (None, False, [], {}):
            raise AdapterhubError(f"PEFT adapter option {key}={config[key]!r} has no adapterhub equivalent")


def _variant_for(config: dict[str, Any], peft_type: str, name: str) -> tuple[str, dict[str, Any]]:
    if peft_type == "LORA":
        r = _pattern_value(config.get("rank_pattern") or {}, name, config.get("r", 8))
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", 8))
        params: dict[str, Any] = {"r": int(r), "alpha": float(alpha)}
        if config.get("use_rslora"):
            params["rslora"] = True
        if config.get("lora_dropout"):
            params["dropout"] = float(config["lora_dropout"])
        if config.get("init_lora_weights") == "gaussian":
            params["init"] = "gaussian"
        return ("dora" if config.get("use_dora") else "lora"), params
    if peft_type == "VERA":
        params = {"r": int(config.get("r", 256)), "seed": int(config.get("projection_prng_key", 0))}
        if float(config.get("d_initial", 0.1)) != 0.1:
            params["d_init"] = float(config["d_initial"])
        if not config.get("save_projection", True):
            params["save_projection"] = False
        return "vera", params
    ff = config.get("feedforward_modules") or []
    is_ff = bool(re.fullmatch(ff, name)) if isinstance(ff, str) else any(name.endswith(t) for t in ff)
    return "ia3", {"feedforward": True} if is_ff else {}


# --------------------------------------------------------------------------- spec text


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(_number(v)) if isinstance(v, float) else str(v)
    return json.dumps(str(v))


def _ranges(indices: list[int]) -> str:
    xs = sorted(set(indices))
    parts, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}..{a}")
            start = b
    return "[" + ",".join(parts) + "]"


def compress_names(names: list[str], roles: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Spec patterns selecting exactly ``names`` (full module names): the first layer index becomes an
    index set and leaf names sharing everything else become ``{a,b}``; role words are braced
    (``{layers}``) so that they match literally."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for name in names:
        segs = name.split(".")
        pos = next((i for i, s in enumerate(segs) if s.isdigit() and i < len(segs) - 1), None)
        if pos is None:
            groups.setdefault(tuple(segs), [])
        else:
            groups.setdefault(tuple(segs[:pos]) + ("#",) + tuple(segs[pos + 1:]), []).append(int(segs[pos]))
    merged: dict[tuple[tuple[str, ...], tuple[int, ...]], list[str]] = {}
    for template, idx in groups.items():
        merged.setdefault((template[:-1], tuple(sorted(set(idx)))), []).append(template[-1])
    out = []
    for (head, idx), leaves in merged.items():
        segs = [_ranges(list(idx)) if s == "#" else (f"{{{s}}}" if s in roles else s) for s in head]
        if len(leaves) > 1:
            segs.append("{" + ",".join(sorted(leaves)) + "}")
        else:
            segs.append(f"{{{leaves[0]}}}" if leaves[0] in roles else leaves[0])
        out.append(".".join(segs))
    return sorted(out)


def spec_text(resolution: PeftResolution, header: str = "", roles: set[str] | frozenset[str] = frozenset(),
              base: str | None = None) -> str:
    """An adapterhub spec for ``resolution``: one rule per group of modules with equal parameters."""
    groups: dict[tuple[str, str], list[str]] = {}
    for module, (variant, params) in resolution.variants.items():
        args = ", ".join(f"{k}={_value(v)}" for k, v in params.items())
        call = f"{variant}({args})" if args else variant
        groups.setdefault((call, variant), []).append(module)
    lines = [f"# {line}" for line in header.splitlines()]
    if base:
        lines.append(f"base {json.dumps(base)}")
    for (call, _), modules in groups.items():
        lines += [f"{p} -> {call}" for p in compress_names(modules, roles)]
    lines += [f"{p} -> train" for p in compress_names(resolution.train, roles)] if resolution.train else []
    return "\n".join(lines) + "\n"


def spec_from_config(config: dict[str, Any], model: nn.Module, source: str = "") -> str:
    """The adapterhub spec equivalent to a PEFT config on ``model`` (a fresh, un-adapted model)."""
    from adapterhub.registry import get_registry

    from .planning import plan

    resolution = resolve_peft(config, model)
    roles = set(get_registry().alias_table())
    text = spec_text(resolution, f"translated from PEFT's adapter_config.json{' in ' + source if source else ''}",
                     roles, config.get("base_model_name_or_path"))
    p = plan(model, text)
    got = {e.module: e.variant for e in p.entries if e.action == "variant"}
    trained = sorted(e.module for e in p.entries if e.action == "train")
    if got != {m: v for m, (v, _) in resolution.variants.items()} or trained != sorted(resolution.train):
        raise AdapterhubError("internal error: the spec translated from adapter_config.json does not select "
                              "the modules PEFT targets")
    return text
