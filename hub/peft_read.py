"""Reading PEFT's ``adapter_config.json`` back as an adapterhub spec (the writer is :mod:`peft_format`).

PEFT's matching is reproduced (``peft.tuners.tuners_utils.check_target_module_exists``:
``exclude_modules``, ``modules_to_save`` exclusion, a ``str`` target is ``re.fullmatch``, a list matches
exactly or as a dotted suffix, ``layers_to_transform`` / ``layers_pattern``; ``"all-linear"``;
``rank_pattern``/``alpha_pattern`` first match in dict order, ``re.match(rf"(.*\\.)?({key})$")``) on the
live model, and the result is written as a spec with one rule per group of modules with the same
parameters. Options that only affect initialisation or training are kept where adapterhub has them and
otherwise ignored; options that change the forward and that adapterhub lacks are refused by name.

``task_type`` must be null or one of PEFT's :data:`TASK_TYPES`. PEFT's task models add their head to
``modules_to_save`` (:data:`TASK_HEADS`): ``SEQ_CLS`` adds ``classifier``/``score`` before the targets are
matched (so they are never targets), ``TOKEN_CLS`` and ``QUESTION_ANS`` add theirs after; the heads found
are read as ``train`` rules like any ``modules_to_save`` entry.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from adapterhub.registry import AdapterhubError, AdapterLayer, module_kind

from .peft_format import CONFIG, _number, base_module_names
from .report import index_ranges

#: PEFT's ``TaskType`` values (``peft.utils.peft_types``, peft 0.21.2).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: ``task_type`` → (module names its PEFT task model appends to ``modules_to_save``, whether it does so
#: before the targets are matched) -- ``PeftModelForSequenceClassification`` & co. in ``peft.peft_model``.
TASK_HEADS: dict[str, tuple[tuple[str, ...], bool]] = {
    "SEQ_CLS": (("classifier", "score"), True),
    "TOKEN_CLS": (("classifier", "score"), False),
    "QUESTION_ANS": (("qa_outputs",), False),
}
_LORA_UNSUPPORTED = ("alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication",
                     "megatron_config", "monteclora_config", "target_parameters", "trainable_token_indices",
                     "use_bdlora", "velora_config")


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
    task_type(config, str(path))
    return config


def task_type(config: dict[str, Any], where: str = "the PEFT config") -> str | None:
    """The config's ``task_type`` (None when null or absent); anything but one of PEFT's
    :data:`TASK_TYPES` is an error naming ``where``."""
    value = config.get("task_type")
    if value is None:
        return None
    if not isinstance(value, str) or value not in TASK_TYPES:
        raise AdapterhubError(f"{where}: task_type {value!r} is not a PEFT task type (PEFT defines "
                              f"{', '.join(TASK_TYPES)}, or null)")
    return value


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
    task = task_type(config)
    names = base_module_names(model) if names is None else names
    _refuse_unsupported(config, peft_type)
    heads, before = TASK_HEADS.get(task or "", ((), False))
    save = [*(config.get("modules_to_save") or []), *heads]
    if before:  # SEQ_CLS: PEFT extends modules_to_save before matching, so the heads are never targets
        config["modules_to_save"] = save
    if config.get("target_modules") is None:
        config["target_modules"] = _default_targets(config, model)
    if isinstance(config["target_modules"], str) and config["target_modules"].lower() == "all-linear":
        config["target_modules"] = _all_linear(model, names)
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
    for n in variants:
        t = next((t for t in train if n == t or n.startswith(t + ".") or t.startswith(n + ".")), None)
        if t is not None:
            via = f", to which task_type {task} adds {', '.join(heads)}" if task in TASK_HEADS else ""
            raise AdapterhubError(f"the PEFT config both adapts '{n}' (target_modules) and trains '{t}' in full "
                                  f"(modules_to_save{via}); adapterhub cannot hold both on one module")
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
        segs = [index_ranges(idx) if s == "#" else (f"{{{s}}}" if s in roles else s) for s in head]
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
