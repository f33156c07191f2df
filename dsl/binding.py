"""Bind a parsed Spec to a registry: look up variants and quantizers, check and build their params.

Only the registry's ``variants`` and ``quantizers`` mappings (name -> object with ``.name`` and
``.Params``) are used, so any object of that shape works. ``defaults NAME(args)`` lines supply
arguments to the rules *after* them; a rule's own arguments override them.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from adapterhub.registry.errors import ParamError
from adapterhub.registry.params import bind

from .ast import Arg, Call, Pos, Rule, Spec
from .errors import SurgeryError


@dataclass(frozen=True)
class BoundRule:
    """A rule with its variant and quantizer resolved and their parameters bound."""

    rule: Rule
    index: int  # position in spec.rules
    variant: Any | None  # registry.variants[name] when rule.action.kind == "variant"
    params: Any | None  # the variant's Params instance (defaults applied, rule args override)
    quantizer: Any | None
    quant_params: Any | None


def bind_spec(spec: Spec, registry: Any) -> tuple[BoundRule, ...]:
    """Resolve every rule of ``spec`` against ``registry``; raise :class:`SurgeryError` at the culprit."""
    binder = _Binder(spec, dict(getattr(registry, "variants", {}) or {}),
                     dict(getattr(registry, "quantizers", {}) or {}))
    try:
        binder.check_defaults()
        return tuple(binder.bind_rule(i, rule) for i, rule in enumerate(spec.rules))
    except SurgeryError as exc:
        raise exc.locate(spec.source, spec.filename) from None


def _did_you_mean(name: str, known: list[str], kind: str) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    listing = ", ".join(sorted(known)) or "none"
    return (f"did you mean '{close[0]}'? " if close else "") + f"known {kind}: {listing}"


class _Binder:
    def __init__(self, spec: Spec, variants: Mapping[str, Any], quantizers: Mapping[str, Any]):
        self.spec = spec
        self.variants = variants
        self.quantizers = quantizers

    # ---------------------------------------------------------------- lookups

    def variant(self, call: Call) -> Any:
        if call.name in self.variants:
            return self.variants[call.name]
        if call.name in self.quantizers:
            raise _fail(f"'{call.name}' is a quantizer, not an adapter variant", call.pos,
                        f"quantize with an 'on' clause: freeze on {call.name}, or lora(r=8) on {call.name}")
        raise _fail(f"unknown variant '{call.name}'", call.pos,
                    _did_you_mean(call.name, list(self.variants), "variants"))

    def quantizer(self, call: Call) -> Any:
        if call.name in self.quantizers:
            return self.quantizers[call.name]
        if call.name in self.variants:
            raise _fail(f"'{call.name}' is an adapter variant, not a quantizer", call.pos,
                        f"put the variant after '->': PATTERN -> {call.name} on nf4")
        raise _fail(f"unknown quantizer '{call.name}'", call.pos,
                    _did_you_mean(call.name, list(self.quantizers), "quantizers"))

    # ---------------------------------------------------------------- binding

    def check_defaults(self) -> None:
        """Every ``defaults`` line must name a known variant or quantizer with valid arguments."""
        for call in self.spec.defaults:
            obj = self.variants.get(call.name, self.quantizers.get(call.name))
            if obj is None:
                known = list(self.variants) + list(self.quantizers)
                raise _fail(f"unknown variant or quantizer '{call.name}' in defaults", call.pos,
                            _did_you_mean(call.name, known, "variants and quantizers"))
            self.params(obj, call, {a.name: a for a in call.args})

    def bind_rule(self, index: int, rule: Rule) -> BoundRule:
        action, quant = rule.action, rule.quant
        variant = params = quantizer = quant_params = None
        if action.kind == "variant" and action.call is not None:
            variant = self.variant(action.call)
            params = self.params(variant, action.call, self.merged(action.call, rule.line))
        if quant is not None:
            if action.kind in ("skip", "train"):
                why = ("skip leaves the module untouched" if action.kind == "skip"
                       else "train trains the module in full precision")
                raise _fail(f"'{action.kind}' cannot have an 'on' clause: {why}", quant.pos,
                            f"to quantize a frozen module write freeze on {quant.name}")
            quantizer = self.quantizer(quant)
            quant_params = self.params(quantizer, quant, self.merged(quant, rule.line))
        return BoundRule(rule, index, variant, params, quantizer, quant_params)

    def merged(self, call: Call, line: int) -> dict[str, Arg]:
        """The call's arguments over the ``defaults`` for its name given above ``line``."""
        args: dict[str, Arg] = {}
        for d in self.spec.defaults:
            if d.name == call.name and d.pos.line < line:
                args.update({a.name: a for a in d.args})
        args.update({a.name: a for a in call.args})
        return args

    def params(self, obj: Any, call: Call, args: dict[str, Arg]) -> Any:
        owner = getattr(obj, "name", None) or call.name
        params_cls = getattr(obj, "Params", None)
        if params_cls is None:
            if args:
                first = next(iter(args.values()))
                raise _fail(f"{owner} takes no parameters", first.pos)
            return None
        values = {name: arg.value.to_python() for name, arg in args.items()}
        try:
            return bind(params_cls, values, owner=owner)
        except ParamError as exc:
            hint = _prefix_hint(str(exc), exc.param, params_cls)
            raise _fail(str(exc), _culprit(exc.param, args, call, params_cls), hint) from None
        except Exception as exc:  # a plugin's __post_init__ may raise anything; report it at the call
            raise _fail(f"{owner}: {exc}", call.pos) from None


def _prefix_hint(message: str, param: str | None, params_cls: type) -> str | None:
    """For an unknown name with no close match, suggest a parameter it abbreviates or extends
    (``rank`` -> ``r``)."""
    if not param or "did you mean" in message or "has no parameter" not in message:
        return None
    names = [f.name for f in dataclasses.fields(params_cls)]
    found = [n for n in names if param.startswith(n) or n.startswith(param)]
    return f"did you mean '{found[0]}'?" if found else None


def _culprit(param: str | None, args: dict[str, Arg], call: Call, params_cls: type) -> Pos:
    """Where a ParamError points: an unknown name at the name, a bad value (or list item) at the value."""
    key, _, rest = (param or "").partition("[")
    arg = args.get(key)
    if arg is None:
        return call.pos
    if key not in {f.name for f in dataclasses.fields(params_cls)}:
        return arg.pos
    value = arg.value
    for part in rest.rstrip("]").split("][") if rest else ():
        if value.kind == "list" and part.isdigit() and int(part) < len(value.value):
            value = value.value[int(part)]
    return value.pos


def _fail(message: str, pos: Pos, hint: str | None = None) -> SurgeryError:
    return SurgeryError(message, line=pos.line, column=pos.column, hint=hint)
