"""The parsed form of a ``.surgery`` file: frozen dataclasses that keep line and column.

Lines and columns are 1-based, as editors show them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Pos:
    """A place in the source: 1-based line and column, and the end column (exclusive)."""

    line: int
    column: int
    end_column: int | None = None


@dataclass(frozen=True)
class Value:
    """A literal argument value. ``kind`` is one of int, float, bool, string, list, ident."""

    kind: Literal["int", "float", "bool", "string", "list", "ident"]
    value: Any  # python value; a tuple of Value for lists
    text: str  # the source text, for error messages
    pos: Pos

    def to_python(self) -> Any:
        if self.kind == "list":
            return [v.to_python() for v in self.value]
        return self.value


@dataclass(frozen=True)
class Arg:
    """``name=value`` inside a call."""

    name: str
    value: Value
    pos: Pos  # position of the name


@dataclass(frozen=True)
class Call:
    """``name(arg=value, ...)`` -- a variant or a quantizer. ``args`` may be empty."""

    name: str
    args: tuple[Arg, ...]
    pos: Pos  # position of the name

    def kwargs(self) -> dict[str, Any]:
        return {a.name: a.value.to_python() for a in self.args}


@dataclass(frozen=True)
class Segment:
    """One dotted segment of a pattern.

    kind:
      ``literal`` -- ``regex`` matches the whole segment (``{q,v}_proj`` becomes ``(?:q|v)_proj``),
                     ``text`` is the source text;
      ``star``    -- ``*``, exactly one segment;
      ``globstar``-- ``**``, zero or more segments;
      ``range``   -- ``[0..3,7]``, a non-negative integer segment in ``indices`` (inclusive ranges).
    """

    kind: Literal["literal", "star", "globstar", "range"]
    text: str
    pos: Pos
    regex: str = ""
    indices: tuple[tuple[int, int], ...] = ()

    @property
    def is_plain(self) -> bool:
        """A literal without alternatives or wildcards (a role alias can only be a plain word)."""
        return self.kind == "literal" and self.regex == _escape_plain(self.text)


def _escape_plain(text: str) -> str:
    import re

    return re.escape(text)


@dataclass(frozen=True)
class Pattern:
    """A dotted glob matched against the *end* of a module's full name."""

    text: str
    segments: tuple[Segment, ...]
    pos: Pos


ActionKind = Literal["variant", "skip", "train", "freeze"]


@dataclass(frozen=True)
class Action:
    """What a rule does: a variant call, or one of the keywords skip / train / freeze."""

    kind: ActionKind
    pos: Pos
    call: Call | None = None  # set when kind == "variant"


@dataclass(frozen=True)
class Rule:
    """``pattern -> action [on quantizer]`` on one line."""

    pattern: Pattern
    action: Action
    quant: Call | None
    line: int
    text: str  # the rule's source line, stripped


@dataclass(frozen=True)
class Spec:
    """A whole ``.surgery`` file."""

    rules: tuple[Rule, ...]
    base: str | None = None
    source: str = ""
    filename: str = "<spec>"
    defaults: tuple[Call, ...] = ()  # `defaults lora(r=8)` lines, in order
