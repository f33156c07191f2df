"""Resolving a spec against a model: which leaf module gets which action, and what it costs.

Semantics (see docs/surgery.md): a pattern matches the end of a module's dotted name; a matched
container stands for its eligible leaves; for every leaf the *last* matching rule wins; a rule
that matches no module is an error listing the nearest names; a rule whose every leaf is taken
by later rules is reported as shadowed (a warning).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

from adapterhub.dsl import BoundRule, Spec, SurgeryError, bind_spec, compile_pattern, load_spec, nearest
from adapterhub.registry import (
    AdapterhubError,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    Quantizer,
    Registry,
    bind,
    get_registry,
    to_dict,
)
from adapterhub.registry.base import LEAF_KINDS


@dataclass
class PlanEntry:
    """One leaf module and what happens to it."""

    module: str
    type_name: str
    action: str  # variant | skip | train | freeze
    variant: str | None
    params: dict[str, Any]
    quant: str | None
    quant_params: dict[str, Any]
    trainable: int
    params_before: int
    bytes_before: int
    bytes_after: int
    rule_line: int
    rule_text: str
    rule_index: int = 0  # position of the winning rule in the spec


@dataclass
class Plan:
    """The resolved spec: entries in module order, totals, and warnings."""

    model: str
    spec: Spec
    entries: list[PlanEntry]
    total_params: int  # parameters of the model before surgery
    total_bytes: int  # bytes of the model's weights before surgery
    warnings: list[str] = field(default_factory=list)
    bound: tuple[BoundRule, ...] = ()

    @property
    def trainable(self) -> int:
        return sum(e.trainable for e in self.entries)

    @property
    def added_params(self) -> int:
        return sum(e.trainable for e in self.entries if e.action == "variant")

    @property
    def trainable_percent(self) -> float:
        total = self.total_params + self.added_params
        return 100.0 * self.trainable / total if total else 0.0

    @property
    def bytes_after(self) -> int:
        return self.total_bytes - sum(e.bytes_before - e.bytes_after for e in self.entries)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "modules": len([e for e in self.entries if e.action != "skip"]),
            "trainable_params": self.trainable,
            "total_params": self.total_params + self.added_params,
            "trainable_percent": round(self.trainable_percent, 6),
            "weight_bytes_before": self.total_bytes,
            "weight_bytes_after": self.bytes_after,
        }

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.spec.filename, "base": self.spec.base, **self.summary(),
                "warnings": list(self.warnings), "entries": [asdict(e) for e in self.entries]}


# --------------------------------------------------------------------------- resolution


def _targets_containers(br: BoundRule) -> bool:
    return br.variant is not None and any(k not in LEAF_KINDS for k in br.variant.kinds)


def _eligible(br: BoundRule, info: ModuleInfo) -> bool:
    if not info.is_leaf:
        return _targets_containers(br) and info.kind in br.variant.kinds
    kind = br.rule.action.kind
    if kind == "skip":
        return True
    if kind in ("train", "freeze"):
        return info.own_params + info.tied_params > 0 or info.kind == "adapter"
    ok = info.kind in br.variant.kinds
    if br.quantizer is not None:
        ok = ok and (info.kind in br.quantizer.kinds or info.quantized == br.quantizer.name)
    return ok


def _error(spec: Spec, pos: Any, message: str, hint: str | None = None) -> SurgeryError:
    return SurgeryError(message, line=pos.line, column=pos.column, hint=hint).locate(spec.source, spec.filename)


def resolve(spec: Spec, infos: Sequence[ModuleInfo], registry: Registry | None = None,
            model_name: str = "model", weights: Callable[[str], Any] | None = None) -> Plan:
    """Resolve ``spec`` against the modules ``infos`` (from ``module_infos``/``checkpoint_infos``).

    ``weights(name)`` loads a module's weight (``out x in``) for quantizers that allocate
    per-module parameters from the weights (``Quantizer.allocate``); it is never called otherwise.
    """
    registry = registry or get_registry()
    bound = bind_spec(spec, registry)
    aliases = registry.alias_table()
    by_name = {i.name: i for i in infos}
    leaves = [i for i in infos if i.is_leaf]
    names = [i.name for i in infos if i.name]

    winner: dict[str, int] = {}  # leaf name -> index into bound
    covered: list[list[str]] = []
    for br in bound:
        matcher = compile_pattern(br.rule.pattern, aliases)
        matched = {n for n in names if matcher.matches(n)}
        if not matched:
            close = nearest(br.rule.pattern.text, names)
            hint = ("nearest module names: " + ", ".join(close)) if close else None
            raise _error(spec, br.rule.pattern.pos,
                         f"pattern '{br.rule.pattern.text}' matches no module of {model_name}", hint)
        hit = [by_name[n] for n in sorted(matched) if _targets_containers(br) and by_name[n].kind in br.variant.kinds]
        for leaf in leaves:
            name = leaf.name
            if name not in matched:
                parts = name.split(".")
                if not any(".".join(parts[:k]) in matched for k in range(1, len(parts))):
                    continue
            hit.append(leaf)
        eligible = [leaf for leaf in hit if _eligible(br, leaf)]
        if not eligible:
            raise _no_eligible(spec, br, hit or [by_name[n] for n in sorted(matched)])
        covered.append([leaf.name for leaf in eligible])
        for leaf in eligible:
            winner[leaf.name] = br.index

    warnings = []
    won = set(winner.values())
    for br, names_hit in zip(bound, covered):
        if br.index not in won:
            later = sorted({bound[winner[n]].rule.line for n in names_hit})
            warnings.append(f"{spec.filename}:{br.rule.line}: rule '{br.rule.text}' is shadowed: every module "
                            f"it matches is taken by later rules (line{'s' if len(later) > 1 else ''} "
                            f"{', '.join(map(str, later))})")

    overrides = _allocate(spec, bound, winner, by_name, weights)
    entries = []
    for name, i in winner.items():
        try:
            entries.append(_entry(by_name[name], bound[i], overrides.get(name)))
        except (ModuleTypeError, ParamError) as exc:  # e.g. prefix tuning on an encoder model
            raise _error(spec, bound[i].rule.action.pos, str(exc)) from None
    order = {i.name: k for k, i in enumerate(infos)}
    entries.sort(key=lambda e: order[e.module])
    shared_seen: set[str] = set()
    for e in entries:  # tensors shared across modules count once, on the first module using them
        br = bound[e.rule_index]
        if e.action == "variant":
            for key, numel in br.variant.shared_trainable_params(br.params, by_name[e.module]).items():
                if key not in shared_seen:
                    shared_seen.add(key)
                    e.trainable += numel
    total_params = sum(i.own_params for i in infos)
    total_bytes = sum(i.weight_bytes for i in infos)
    return Plan(model_name, spec, entries, total_params, total_bytes, warnings, bound)


def _no_eligible(spec: Spec, br: BoundRule, hit: list[ModuleInfo]) -> SurgeryError:
    kind = br.rule.action.kind
    types = sorted({f"{i.type_name}" for i in hit})
    example = hit[0].name if hit else "?"
    if kind == "variant":
        what = br.variant.name
        wraps = ", ".join(sorted(br.variant.kinds))
        if any(i.kind == "adapter" for i in hit):
            return _error(spec, br.rule.action.pos,
                          f"{what}: module '{example}' already has an adapter; remove it first or skip it")
        if br.quantizer is not None and any(i.kind in br.variant.kinds for i in hit):
            q = br.quantizer
            return _error(spec, br.rule.quant.pos,
                          f"{q.name} cannot quantize the modules '{br.rule.pattern.text}' matches "
                          f"(types: {', '.join(types)}; {q.name} quantizes: {', '.join(sorted(q.kinds))})")
        return _error(spec, br.rule.action.pos,
                      f"{what} cannot wrap any module '{br.rule.pattern.text}' matches: e.g. '{example}' "
                      f"(types: {', '.join(types)}; {what} wraps: {wraps})")
    return _error(spec, br.rule.action.pos,
                  f"'{br.rule.pattern.text}' matches no module with parameters to {kind} (e.g. '{example}', "
                  f"types: {', '.join(types)})")


def _allocate(spec: Spec, bound: Sequence[BoundRule], winner: dict[str, int], by_name: dict[str, ModuleInfo],
              weights: Callable[[str], Any] | None) -> dict[str, dict[str, Any]]:
    """Per-module quantizer parameters from quantizers that allocate (LQ-LoRA's bits budget)."""
    out: dict[str, dict[str, Any]] = {}
    for br in bound:
        q = br.quantizer
        if q is None or type(q).allocate is Quantizer.allocate:
            continue
        names = [n for n, i in winner.items() if i == br.index and by_name[n].kind in q.kinds]
        if not names:
            continue
        if weights is None:
            raise _error(spec, br.rule.quant.pos, f"{q.name} chooses a configuration per matrix from the weights; "
                                             "plan on a live model or a checkpoint with its safetensors")
        try:
            chosen = q.allocate(br.quant_params, [(by_name[n], partial(weights, n)) for n in names])
        except (ParamError, AdapterhubError) as exc:
            raise _error(spec, br.rule.quant.pos, str(exc)) from None
        for name, values in (chosen or {}).items():
            out[name] = {**to_dict(br.quant_params), **values}
    return out


def _entry(info: ModuleInfo, br: BoundRule, qoverride: dict[str, Any] | None = None) -> PlanEntry:
    kind = br.rule.action.kind
    trainable, after = 0, info.weight_bytes
    quant = br.quantizer.name if br.quantizer is not None else None
    qparams = qoverride or (to_dict(br.quant_params) if br.quant_params is not None else {})
    vinfo = info
    if quant is not None and info.kind in br.quantizer.kinds and info.quantized is None:
        n = (info.in_features or 0) * (info.out_features or 0)
        bias_bytes = info.weight_bytes - n * _itemsize(info.dtype)
        bound_q = bind(br.quantizer.Params, qparams, owner=quant) if qoverride else br.quant_params
        after = math.ceil(n * br.quantizer.bits_per_param(bound_q) / 8) + max(bias_bytes, 0)
        vinfo = replace(info, quantized=quant, extra={**info.extra, "quant_params": qparams})
    elif quant is not None:
        quant = None  # e.g. a norm inside a frozen-on-int8 container: frozen, not quantized
        qparams = {}
    if kind == "variant":
        trainable = br.variant.trainable_params(br.params, vinfo)
    elif kind == "train":
        trainable = info.own_params + info.tied_params
    return PlanEntry(
        module=info.name, type_name=info.type_name, action=kind,
        variant=br.variant.name if br.variant is not None else None,
        params=to_dict(br.params) if br.params is not None else {}, quant=quant, quant_params=qparams,
        trainable=trainable, params_before=info.own_params, bytes_before=info.weight_bytes,
        bytes_after=after, rule_line=br.rule.line, rule_text=br.rule.text,
        rule_index=br.index)


def _itemsize(dtype: str | None) -> int:
    import torch

    return getattr(torch, dtype or "float32", torch.float32).itemsize


def plan(model_or_path: Any, spec: Any, registry: Registry | None = None) -> Plan:
    """Plan ``spec`` (text, path or Spec) on a live ``nn.Module``, a checkpoint directory, a
    built-in model name or a cached Hub id -- without loading weights for the latter three."""
    from torch import nn

    from .models import (
        BUILTIN_MODELS,
        build_builtin,
        checkpoint_infos,
        module_infos,
        module_weight_loader,
        resolve_source,
        safetensors_weight_loader,
    )

    spec = load_spec(spec)
    if isinstance(model_or_path, nn.Module):
        name = getattr(getattr(model_or_path, "config", None), "_name_or_path", "") or type(model_or_path).__name__
        return resolve(spec, module_infos(model_or_path), registry, name, module_weight_loader(model_or_path))
    target = str(model_or_path)
    if target in BUILTIN_MODELS:
        model = build_builtin(target)
        return resolve(spec, module_infos(model), registry, target, module_weight_loader(model))
    src = resolve_source(target, need_weights=False)
    if src.path is None:
        raise AdapterhubError(f"cannot plan on '{target}'")
    infos, name = checkpoint_infos(src.path)
    conv1d = frozenset(i.name for i in infos if i.kind == "conv1d")
    return resolve(spec, infos, registry, name if src.kind == "dir" else target,
                   safetensors_weight_loader(src.path, conv1d))
