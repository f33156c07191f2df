"""Parse ``.surgery`` text into a :class:`~adapterhub.dsl.ast.Spec`.

``parse`` checks syntax, pattern structure, duplicate arguments and the ``base`` header; binding
names to the registry (unknown variants, parameter types) is :func:`adapterhub.dsl.bind_spec`.
Every failure is a :class:`~adapterhub.dsl.errors.SurgeryError` with line and column.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from lark import Lark, Token, Transformer, Tree
from lark.exceptions import UnexpectedInput, VisitError

from adapterhub.registry.errors import AdapterhubError

from .ast import Action, Arg, Call, Pos, Rule, Spec, Value
from .errors import SurgeryError, from_lark, source_line
from .patterns import parse_pattern

MAX_LIST_DEPTH = 16
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t", "r": "\r", "0": "\0", "/": "/"}


@functools.lru_cache(maxsize=1)
def grammar() -> Lark:
    """The LALR parser for the language, built once (no cache file is written)."""
    return Lark.open_from_package("adapterhub.dsl", "surgery.lark", parser="lalr",
                                  propagate_positions=True, maybe_placeholders=False)


def _raw_parse(text: str) -> Tree:
    return grammar().parse(text)


def _pos(tok: Token) -> Pos:
    return Pos(tok.line, tok.column, tok.end_column)


def _fail(message: str, tok: Token | Pos, hint: str | None = None) -> SurgeryError:
    return SurgeryError(message, line=tok.line, column=tok.column, hint=hint)


class _ToAst(Transformer):
    """Builds the AST; statements come out as ("base", ...), Call (defaults) or Rule."""

    def __init__(self, text: str):
        super().__init__()
        self._text = text

    def start(self, items: list) -> list:
        return items

    def header(self, items: list) -> tuple:
        tok = items[1]
        value = _string(tok)
        if not value.strip():
            raise _fail("the base model id is empty", tok, 'write base "org/name"')
        return ("base", value, items[0])

    def defaults(self, items: list) -> tuple:
        return ("defaults", self._call(items[1], items[2]), items[0])

    def rule(self, items: list) -> Rule:
        pattern, _, action, *rest = items
        line = pattern.pos.line
        text = source_line(self._text, line).strip()
        return Rule(pattern=pattern, action=action, quant=rest[0] if rest else None, line=line, text=text)

    def pattern(self, items: list):
        tok = items[0]
        return parse_pattern(str(tok), tok.line, tok.column)

    def action(self, items: list) -> Action:
        call = items[0]
        return Action("variant", call.pos, call)

    def skip(self, items: list) -> Action:
        return Action("skip", _pos(items[0]))

    def train(self, items: list) -> Action:
        return Action("train", _pos(items[0]))

    def freeze(self, items: list) -> Action:
        return Action("freeze", _pos(items[0]))

    def quant(self, items: list) -> Call:
        return items[1]

    def call(self, items: list) -> Call:
        return self._call(items[0], items[1] if len(items) > 1 else ())

    def _call(self, name: Token, args) -> Call:
        seen: dict[str, Arg] = {}
        for arg in args:
            if arg.name in seen:
                first = seen[arg.name]
                raise _fail(f"duplicate argument '{arg.name}' in {name}(...)", arg.pos,
                            f"'{arg.name}' is already given at column {first.pos.column}")
            seen[arg.name] = arg
        return Call(str(name), tuple(args), _pos(name))

    def args(self, items: list) -> tuple:
        return tuple(i for i in items if isinstance(i, Arg))

    def arg(self, items: list) -> Arg:
        name, _, value = items
        return Arg(str(name), value, _pos(name))

    def int(self, items: list) -> Value:
        tok = items[0]
        try:
            value = int(tok)
        except ValueError:
            raise _fail("integer too large", tok) from None
        return Value("int", value, str(tok), _pos(tok))

    def float(self, items: list) -> Value:
        tok = items[0]
        return Value("float", float(tok), str(tok), _pos(tok))

    def true(self, items: list) -> Value:
        return Value("bool", True, "true", _pos(items[0]))

    def false(self, items: list) -> Value:
        return Value("bool", False, "false", _pos(items[0]))

    def string(self, items: list) -> Value:
        tok = items[0]
        return Value("string", _string(tok), str(tok), _pos(tok))

    def ident(self, items: list) -> Value:
        tok = items[0]
        return Value("ident", str(tok), str(tok), _pos(tok))

    def list(self, items: list) -> Value:
        open_, close = items[0], items[-1]
        values = tuple(i for i in items if isinstance(i, Value))
        text = source_line(self._text, open_.line)[open_.column - 1:close.end_column - 1]
        return Value("list", values, text, Pos(open_.line, open_.column, close.end_column))


def _string(tok: Token) -> str:
    """Decode a STRING token: \\\\ \\" \\n \\t \\r \\0 \\/ \\' and \\uXXXX escapes."""
    raw = str(tok)[1:-1]
    out: list[str] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        nxt = raw[i + 1]  # the token regex guarantees a character after a backslash
        col = tok.column + 1 + i
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt == "u":
            digits = raw[i + 2:i + 6]
            if len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
                raise SurgeryError("\\u must be followed by four hex digits", line=tok.line, column=col)
            out.append(chr(int(digits, 16)))
            i += 6
        else:
            raise SurgeryError(f"unknown escape '\\{nxt}' in string", line=tok.line, column=col,
                               hint="write '\\\\' for a backslash")
    return "".join(out)


def _check_depth(tree: Tree) -> None:
    """Refuse lists nested deeper than MAX_LIST_DEPTH (before the recursive transform)."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if node.data == "list":
            depth += 1
            if depth > MAX_LIST_DEPTH:
                tok = node.children[0]
                raise _fail(f"lists nested more than {MAX_LIST_DEPTH} deep", tok)
        stack.extend((c, depth) for c in node.children if isinstance(c, Tree))


def _assemble(statements: list, text: str, filename: str) -> Spec:
    rules: list[Rule] = []
    defaults: list[Call] = []
    base: tuple[str, Token] | None = None
    for st in statements:
        if isinstance(st, Rule):
            rules.append(st)
        elif st[0] == "defaults":
            defaults.append(st[1])
        else:
            _, value, tok = st
            if base is not None:
                raise _fail("a second 'base' header", tok, f"the first one is on line {base[1].line}")
            if rules:
                raise _fail("'base' must come before the first rule", tok,
                            f"move it above line {rules[0].line}")
            base = (value, tok)
    return Spec(rules=tuple(rules), base=base[0] if base else None, source=text, filename=filename,
                defaults=tuple(defaults))


def parse(text: str, filename: str = "<spec>") -> Spec:
    """Parse spec ``text``; ``filename`` is used in error messages."""
    if not isinstance(text, str):
        raise TypeError(f"parse() needs the spec text as str, got {type(text).__name__}")
    text = text.removeprefix("\ufeff")
    try:
        tree = _raw_parse(text)
        _check_depth(tree)
        return _assemble(_ToAst(text).transform(tree), text, filename)
    except SurgeryError as exc:
        raise exc.locate(text, filename) from None
    except UnexpectedInput as exc:
        raise from_lark(exc, text, filename, _raw_parse) from None
    except VisitError as exc:
        if isinstance(exc.orig_exc, SurgeryError):
            raise exc.orig_exc.locate(text, filename) from None
        raise _internal(exc.orig_exc, text, filename) from exc.orig_exc
    except (RecursionError, ValueError, IndexError, KeyError, TypeError, AttributeError) as exc:
        raise _internal(exc, text, filename) from exc


def _internal(exc: BaseException, text: str, filename: str) -> SurgeryError:
    """Last resort: a bug in the parser still surfaces as a located SurgeryError."""
    return SurgeryError(f"internal error while parsing: {type(exc).__name__}: {exc}",
                        hint="please report this with the spec that caused it").locate(text, filename)


def parse_file(path: str | os.PathLike) -> Spec:
    """Read and parse a ``.surgery`` file (UTF-8, an optional BOM is fine)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise AdapterhubError(f"spec file not found: '{p}'") from None
    except IsADirectoryError:
        raise AdapterhubError(f"spec path is a directory, not a file: '{p}'") from None
    except OSError as exc:
        raise AdapterhubError(f"cannot read spec file '{p}': {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        before = data[: exc.start].decode("utf-8", errors="replace").removeprefix("\ufeff")
        line = before.count("\n") + 1
        column = len(before) - (before.rfind("\n") + 1) + 1
        shown = data.decode("utf-8", errors="replace").removeprefix("\ufeff")
        raise SurgeryError(f"the file is not valid UTF-8 (byte 0x{data[exc.start]:02x})", line=line,
                           column=column, hint="save the spec as UTF-8").locate(shown, str(p)) from None
    return parse(text, filename=str(p))


def load_spec(source: Spec | str | os.PathLike) -> Spec:
    """A Spec as is; a path (PathLike, or a one-line str that exists or ends with .surgery); or spec text."""
    if isinstance(source, Spec):
        return source
    if isinstance(source, os.PathLike):
        return parse_file(source)
    if not isinstance(source, str):
        raise TypeError(f"expected a Spec, a path or spec text, got {type(source).__name__}")
    if "\n" not in source and "->" not in source and source.strip():
        candidate = source.strip()
        if candidate.endswith(".surgery") or _is_file(candidate):
            return parse_file(candidate)
    return parse(source)


def _is_file(path: str) -> bool:
    try:
        return os.path.isfile(path)
    except (OSError, ValueError):
        return False
