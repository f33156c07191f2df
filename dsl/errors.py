"""``SurgeryError``: a problem in a ``.surgery`` file, with the file, line, column and a caret.

Rendered like a compiler diagnostic::

    spec.surgery:3:15: error: expected '(' or 'on' or end of line, got ')'
        attn.* -> lora) on nf4
                      ^
    hint: after the action only an 'on QUANT' clause or a '#' comment may follow

:func:`from_lark` translates lark's exceptions: the "expected" list is worded from readable
terminal names, and a hint is picked from a table of malformed examples (the way lark's
``match_examples`` does it), keyed by the parser state the error happened in.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from adapterhub.registry.errors import AdapterhubError


def source_line(text: str, line: int) -> str:
    """Line ``line`` (1-based) of ``text`` without its line break; '' when out of range.

    Lines are split on ``\\n`` only, the way the lexer counts them.
    """
    lines = text.split("\n")
    if 1 <= line <= len(lines):
        return lines[line - 1].rstrip("\r")
    return ""


def _printable(text: str) -> str:
    """``text`` with control characters shown as '?', one character each so carets stay aligned."""
    return "".join(ch if ch == "\t" or ch.isprintable() else "?" for ch in text)


class SurgeryError(AdapterhubError):
    """A syntax or binding error in a ``.surgery`` spec.

    ``line`` and ``column`` are 1-based and always set; ``source_line`` is the offending line
    (without its line break) and ``hint`` an optional suggestion.
    """

    def __init__(self, message: str, *, line: int = 1, column: int = 1, filename: str = "<spec>",
                 source_line: str = "", hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.line = max(1, int(line or 1))
        self.column = max(1, int(column or 1))
        self.filename = filename
        self.source_line = source_line
        self.hint = hint

    def locate(self, text: str, filename: str) -> SurgeryError:
        """Fill in the file name and the source line from the whole spec ``text``; returns self."""
        self.filename = filename
        self.source_line = source_line(text, self.line)
        self.args = (str(self),)
        return self

    def __str__(self) -> str:
        head = f"{self.filename}:{self.line}:{self.column}: error: {self.message}"
        shown = _printable(self.source_line)
        pad = "".join("\t" if ch == "\t" else " " for ch in shown[: self.column - 1])
        pad += " " * max(0, self.column - 1 - len(shown))
        out = [head, f"    {shown}".rstrip(), f"    {pad}^"]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return "\n".join(out)

    def __reduce__(self):  # keep keyword-only attributes across pickling (multiprocessing)
        return (_rebuild, (self.message, self.line, self.column, self.filename, self.source_line, self.hint))


def _rebuild(message: str, line: int, column: int, filename: str, source: str,
             hint: str | None) -> SurgeryError:
    return SurgeryError(message, line=line, column=column, filename=filename, source_line=source, hint=hint)


# --------------------------------------------------------------------------- lark translation

# How each terminal reads in "expected ..." lists, in the order they are listed.
TERMINAL_NAMES = {
    "PATTERN": "a pattern", "BASE": "'base'", "DEFAULTS": "'defaults'", "ARROW": "'->'",
    "ACTION": "an action (a variant, skip, train or freeze)", "NAME": "a name",
    "SKIP": "'skip'", "TRAIN": "'train'", "FREEZE": "'freeze'", "EQUAL": "'='",
    "VALUE": "a value", "STRING": "a string", "INT": "an integer", "FLOAT": "a number",
    "TRUE": "'true'", "FALSE": "'false'", "LSQB": "'['", "LPAR": "'('", "COMMA": "','",
    "RPAR": "')'", "RSQB": "']'", "ON": "'on'", "_NL": "end of line", "$END": "end of line",
}
_VALUE = {"INT", "FLOAT", "STRING", "TRUE", "FALSE", "NAME", "LSQB"}
_ACTION = {"NAME", "SKIP", "TRAIN", "FREEZE"}
_IGNORED = {"WS", "COMMENT"}

RULE_SHAPE = "a rule reads PATTERN -> ACTION [on QUANT], e.g. attn.* -> lora(r=8) on nf4"

# (hint, malformed examples). An error gets the hint of the example that failed the same way:
# same token, else same kind of token, else any token; within each, an example in the same LALR
# state (with the same accepted terminals) before one that merely accepts the same terminals.
# Order matters only for the "any token" fallback: the first listed wins.
EXAMPLES: list[tuple[str, list[str]]] = [
    (RULE_SHAPE, ["a lora\n", "a\n", "a (r=8)\n"]),
    ("write '->' (a hyphen and '>') between the pattern and the action", ["a => lora\n", "a = lora\n"]),
    ("a rule starts with a module pattern, e.g. attn.* -> lora(r=8)", ["-> lora\n", "(r=8)\n"]),
    ("after '->' name a variant such as lora(r=8), or skip, train or freeze",
     ["a ->\n", "a -> (r=8)\n", "a -> 3\n"]),
    ("only one 'on' clause is allowed per rule",
     ["a -> lora on nf4 on int8\n", "a -> lora on nf4(b=1) on x\n"]),
    ("name a quantizer after 'on', e.g. on nf4", ["a -> lora on\n", "a -> lora on (x=1)\n"]),
    ("after the action only an 'on QUANT' clause or a '#' comment may follow",
     ["a -> lora(r=8))\n", "a -> lora(r=8) 3\n", "a -> lora)\n", "a -> lora 3\n", "a -> lora on nf4 x\n",
      "a -> lora on nf4)\n", "a -> lora on nf4(b=1) x\n", "a -> skip)\n", "a -> train)\n", "a -> freeze)\n"]),
    ("skip, train and freeze take no arguments", ["a -> skip(r=1)\n", "a -> train(\n", "a -> freeze(\n"]),
    ("write the quantization as 'on QUANT' after the action, e.g. lora(r=8) on nf4",
     ["a -> lora(r=8) nf4\n", "a -> lora lora\n", "a -> skip nf4\n", "a -> train nf4\n",
      "a -> freeze nf4\n"]),
    ("give the argument a value, e.g. r=8", ["a -> lora(r=)\n", "a -> lora(r=,)\n", "a -> lora(r=\n"]),
    ("arguments are named: write name=value, e.g. lora(r=8)", ["a -> lora(8)\n", "a -> lora(r=1, 4)\n"]),
    ("write arguments as name=value, e.g. lora(r=8)",
     ["a -> lora(r 8)\n", "a -> lora(r)\n", "a -> lora(r,\n"]),
    ("separate arguments with ','", ["a -> lora(r=8 alpha=16)\n", "a -> lora(r=8, a=1 b=2)\n"]),
    ("close the argument list with ')'",
     ["a -> lora(r=8\n", "a -> lora(r=8 on nf4\n", "a -> lora(\n", "a -> lora(r=8,\n",
      "a -> lora(r=8, a=1\n", "a -> lora(r=8, a=1 on nf4\n", "a -> lora(r=8, a=[1]\n"]),
    ("close the list with ']'",
     ["a -> lora(x=[1, b=2)\n", "a -> lora(x=[1\n", "a -> lora(x=[1,\n", "a -> lora(x=[\n",
      "a -> lora(x=[1)\n", "a -> lora(x=[1, 2\n", "a -> lora(x=[1, 2)\n", "a -> lora(x=[1, 2,)\n"]),
    ("separate list items with ','", ["a -> lora(x=[1 2])\n", "a -> lora(x=[1, 2 3])\n"]),
    ("quote the model id: base \"org/name\"", ["base meta/x\n", "base\n", "base 3\n"]),
    ("the header is just base \"org/name\" on its own line", ["base \"x\" y\n"]),
    ("defaults needs arguments: defaults lora(r=8, alpha=16)", ["defaults lora\n", "defaults lora r=8\n"]),
    ("name the variant or quantizer: defaults lora(r=8)", ["defaults (r=8)\n", "defaults\n"]),
    ("a defaults line is just defaults NAME(args), e.g. defaults lora(r=8)", ["defaults lora(r=8) x\n"]),
]


def _words(types: set[str]) -> str:
    types = set(types) - _IGNORED
    if "PATTERN" in types:
        types -= {"BASE", "DEFAULTS", "_NL", "$END"}
    if _VALUE <= types:
        types = (types - _VALUE) | {"VALUE"}
    if _ACTION <= types:
        types = (types - _ACTION) | {"ACTION"}
    order = list(TERMINAL_NAMES)
    names: list[str] = []
    for t in sorted(types, key=lambda t: (order.index(t) if t in order else len(order), t)):
        word = TERMINAL_NAMES.get(t, t)
        if word not in names:
            names.append(word)
    return " or ".join(names)


def _got(token_type: str, text: str) -> str:
    """How the offending token reads. A PATTERN-shaped run where no pattern belongs is cut to
    its first word or first symbol (``lora(r]8)`` says got ']', not got ']8')."""
    if token_type in ("_NL", "$END"):
        return "end of line"
    if token_type == "PATTERN" and text:
        word = re.match(r"\w+", text)
        text = word.group(0) if word else text[0]
    return repr(text if len(text) <= 24 else text[:21] + "...")


def _accepts(exc: UnexpectedInput) -> set[str]:
    ip = getattr(exc, "interactive_parser", None)
    if ip is not None:
        try:
            return set(ip.accepts())
        except Exception:  # lark internals; fall back to what the exception lists
            pass
    return set(getattr(exc, "expected", None) or getattr(exc, "allowed", None) or ())


def _key(exc: UnexpectedInput) -> tuple:
    """(parser state, accepted terminals, token type, token text); a bad character is type <char>.

    LALR states that only reduce are shared between contexts (a value inside ``(...)`` and inside
    ``[...]``), so the accepted terminals are part of the key, as in lark's ``match_examples``.
    """
    state = (getattr(getattr(exc, "state", None), "position", -1), frozenset(_accepts(exc)))
    if isinstance(exc, UnexpectedToken):
        if exc.token.type in ("_NL", "$END"):  # the end of the file is the end of a line
            return (*state, "_NL", "\n")
        return (*state, exc.token.type, str(exc.token))
    return (*state, "<char>", getattr(exc, "char", ""))


@functools.lru_cache(maxsize=4)
def _example_keys(parse_raw: Callable[[str], object]) -> tuple[tuple[str, tuple], ...]:
    out = []
    for hint, examples in EXAMPLES:
        for text in examples:
            try:
                parse_raw(text)
            except UnexpectedInput as exc:
                out.append((hint, _key(exc)))
    return tuple(out)


def _hint(exc: UnexpectedInput, parse_raw: Callable[[str], object]) -> str | None:
    """The hint of the closest example: same parser state before same accepted terminals,
    and the same token before the same kind of token before any token."""
    state, accepts, ttype, text = _key(exc)
    examples = _example_keys(parse_raw)
    same_state = [(h, k) for h, k in examples if k[:2] == (state, accepts)]
    same_accepts = [(h, k) for h, k in examples if k[1] == accepts]
    for test in (lambda k: k[2:] == (ttype, text), lambda k: k[2] == ttype, lambda k: True):
        for pool in (same_state, same_accepts):
            for hint, k in pool:
                if test(k):
                    return hint
    return None


def _position(exc: UnexpectedInput) -> tuple[int, int]:
    if isinstance(exc, UnexpectedToken) and exc.token.type == "$END":
        tok = exc.token
        end_line, end_col = getattr(tok, "end_line", None), getattr(tok, "end_column", None)
        if end_line and end_col:
            return end_line, end_col
    return (getattr(exc, "line", 1) or 1), (getattr(exc, "column", 1) or 1)


def from_lark(exc: UnexpectedInput, text: str, filename: str,
              parse_raw: Callable[[str], object]) -> SurgeryError:
    """Turn a lark parse error on ``text`` into a located :class:`SurgeryError`."""
    line, column = _position(exc)
    expected = _words(_accepts(exc))
    hint = _hint(exc, parse_raw)
    if isinstance(exc, UnexpectedCharacters):
        ch = exc.char
        if ch == '"':
            message, hint = "unterminated string", "close the string with '\"' on the same line"
        elif ch == "'":
            message = f"expected {expected}, got \"'\"" if expected else "unexpected \"'\""
            hint = "strings use double quotes: \"...\""
        elif ch == "\r":
            message = "stray carriage return ('\\r') without a line feed"
            hint = "end lines with \\n or \\r\\n"
        else:
            message = f"expected {expected}, got {ch!r}" if expected else f"unexpected character {ch!r}"
    elif isinstance(exc, UnexpectedToken):
        message = f"expected {expected}, got {_got(exc.token.type, str(exc.token))}"
    else:
        message = f"unexpected end of input; expected {expected}" if expected else "unexpected end of input"
    return SurgeryError(message, line=line, column=column, hint=hint).locate(text, filename)
