"""Typed parameters for variants and quantizers.

A plugin declares its parameters as a frozen dataclass whose fields are made with :func:`param`;
:func:`bind` checks names, types and ranges of user values and builds the instance, raising
:class:`ParamError` that names the parameter and says what was expected.

    @dataclass(frozen=True)
    class LoraParams:
        r: int = param(8, "rank of the update", positive=True)
        init: Literal["kaiming", "gaussian"] = param("kaiming", "how A is initialised")
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import ParamError


def param(default: Any, help: str, *, positive: bool = False, min: float | None = None,
          max: float | None = None) -> Any:
    """A dataclass field with help text and range checks (``positive`` means > 0)."""
    meta = {"help": help, "positive": positive, "min": min, "max": max}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """What ``adapterhub plugins`` shows for one parameter."""

    name: str
    type: str
    default: Any
    help: str


def describe(params_cls: type) -> list[ParamInfo]:
    """The parameters of a params dataclass, in declaration order."""
    hints = typing.get_type_hints(params_cls)
    out = []
    for f in dataclasses.fields(params_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        out.append(ParamInfo(f.name, type_name(hints[f.name], f.metadata), default, f.metadata.get("help", "")))
    return out


def type_name(tp: Any, meta: Any = None) -> str:
    """A readable name for an annotation: ``positive int``, ``one of kaiming, gaussian``."""
    meta = meta or {}
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a, meta) for a in get_args(tp) if a is not type(None))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"list of {type_name(args[0])}" if args else "list"
    name = {int: "int", float: "float", bool: "bool", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))
    if meta.get("positive"):
        return f"positive {name}"
    return name


def _fail(name: str, tp: Any, meta: Any, value: Any) -> ParamError:
    shown = repr(value) if not isinstance(value, bool) else str(value).lower()
    what = type_name(tp, meta)
    article = "an" if what[:1] in "aeiou" else "a"
    return ParamError(f"{name} must be {article} {what}, got {shown}", param=name)


def coerce(name: str, tp: Any, meta: Any, value: Any) -> Any:
    """Check ``value`` against annotation ``tp`` and the field's range metadata; return it converted."""
    origin = get_origin(tp)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and not isinstance(value, bool):
            return value
        hint = ""
        if isinstance(value, str):
            close = difflib.get_close_matches(value, [str(c) for c in choices], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ParamError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}{hint}", param=name)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return coerce(name, arg, meta, value)
            except ParamError as exc:
                errors.append(exc)
        if len(errors) == 1:  # `int | None`: the int's own message, range included
            raise errors[0]
        raise _fail(name, tp, meta, value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(name, tp, meta, value)
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [coerce(f"{name}[{i}]", item_tp, {}, v) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(name, tp, meta, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(name, tp, meta, value)
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(name, tp, meta, value)
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise _fail(name, tp, meta, value)
        return value
    if isinstance(value, (int, float)):
        if meta.get("positive") and not value > 0:
            raise _fail(name, tp, meta, value)
        lo, hi = meta.get("min"), meta.get("max")
        if lo is not None and value < lo:
            raise ParamError(f"{name} must be >= {lo}, got {value!r}", param=name)
        if hi is not None and value > hi:
            raise ParamError(f"{name} must be <= {hi}, got {value!r}", param=name)
    return value


def bind(params_cls: type, values: dict[str, Any], *, owner: str) -> Any:
    """Build ``params_cls(**values)`` after checking every name and value.

    ``owner`` names the variant or quantizer in messages (``lora has no parameter 'rank'``).
    A ``ValueError`` raised by the dataclass's ``__post_init__`` becomes a :class:`ParamError`.
    """
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            known = ", ".join(fields) or "none"
            raise ParamError(f"{owner} has no parameter '{key}'{hint} (parameters: {known})", param=key)
        kwargs[key] = coerce(key, hints[key], fields[key].metadata, value)
    try:
        return params_cls(**kwargs)
    except ParamError:
        raise
    except (ValueError, TypeError) as exc:
        raise ParamError(f"{owner}: {exc}") from None


def to_dict(params: Any) -> dict[str, Any]:
    """The parameter values as plain JSON-able data."""
    out = {}
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
