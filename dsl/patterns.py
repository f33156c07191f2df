"""Module-name patterns: parse ``layers.[0..11].attn.{q,v}_proj`` into segments and match names.

A pattern matches the *end* of a module's dotted name. Segments:

- ``q_proj``, ``0``     a literal segment; ``{q,v}_proj`` alternatives; ``*_proj`` a wildcard
                        inside one segment
- ``*``                 exactly one segment
- ``**``                zero or more segments
- ``[0..3,7]``          one segment that is a decimal integer in the set (inclusive ranges)

A plain word that is a role (``attn``, ``mlp``) also matches the role's alias fragments, which
may span several segments (``layer.*.output``). Each pattern compiles to one regex.
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable, Mapping, Sequence

from .ast import Pattern, Pos, Segment
from .errors import SurgeryError

MAX_INDEX_DIGITS = 18
_SEG = r"[^.]+"  # one segment of a module name
_GAP = r"(?:\.[^.]+)*"  # zero or more further segments, each with its dot
_WORD = re.compile(r"\w")


# --------------------------------------------------------------------------- parsing

def parse_pattern(text: str, line: int = 1, column: int = 1) -> Pattern:
    """Parse pattern ``text`` found at ``line``/``column``; errors point at the exact column."""
    segments = []
    for offset, seg in _split(text, line, column):
        segments.append(_segment(seg, line, column + offset))
    return Pattern(text=text, segments=tuple(segments), pos=Pos(line, column, column + len(text)))


def _fail(message: str, line: int, column: int, hint: str | None = None) -> SurgeryError:
    return SurgeryError(message, line=line, column=column, hint=hint)


def _split(text: str, line: int, column: int) -> list[tuple[int, str]]:
    """Split on dots outside ``{}``/``[]``; returns (offset, segment text) pairs."""
    out: list[tuple[int, str]] = []
    opened: tuple[str, int] | None = None  # the open bracket and its offset
    start = 0
    for i, ch in enumerate(text):
        if ch in "{[":
            if opened is not None:
                pair = "{...}" if opened[0] == "{" else "[...]"
                raise _fail(f"'{ch}' inside '{pair}' is not allowed", line, column + i,
                            "alternatives and ranges cannot be nested")
            opened = (ch, i)
        elif ch in "}]":
            want = "{" if ch == "}" else "["
            if opened is None or opened[0] != want:
                raise _fail(f"unbalanced '{ch}': no '{want}' before it", line, column + i)
            opened = None
        elif ch == "." and opened is None:
            out.append((start, text[start:i]))
            start = i + 1
    if opened is not None:
        close = "}" if opened[0] == "{" else "]"
        raise _fail(f"unclosed '{opened[0]}'", line, column + opened[1], f"add the missing '{close}'")
    out.append((start, text[start:]))
    return out


def _segment(seg: str, line: int, col: int) -> Segment:
    pos = Pos(line, col, col + len(seg))
    if not seg:
        raise _fail("empty segment in pattern", line, col,
                    "two dots in a row, or a dot at the start or end; write 'a.b', 'a.*.b' or 'a.**.b'")
    if set(seg) == {"*"}:
        if len(seg) == 1:
            return Segment("star", seg, pos, regex=_SEG)
        if len(seg) == 2:
            return Segment("globstar", seg, pos)
        raise _fail(f"'{seg}' is not a pattern segment", line, col,
                    "use '*' for exactly one segment or '**' for any number of segments")
    if seg.startswith("["):
        return _range_segment(seg, line, col)
    return _literal_segment(seg, line, col)


def _literal_segment(seg: str, line: int, col: int) -> Segment:
    parts: list[str] = []
    i = 0
    while i < len(seg):
        ch = seg[i]
        if ch == "{":
            end = seg.index("}", i)  # _split guarantees it is there
            alts = [_alt_regex(a, line, col + off) for off, a in _alternatives(seg, i + 1, end)]
            parts.append("(?:" + "|".join(alts) + ")")
            i = end + 1
            continue
        if ch == "[":
            raise _fail("a range must be a whole segment", line, col + i,
                        "write it between dots, like layers.[0..3].attn")
        parts.append(_char_regex(seg, i, line, col))
        i += 1
    return Segment("literal", seg, Pos(line, col, col + len(seg)), regex="".join(parts))


def _alternatives(seg: str, start: int, end: int) -> list[tuple[int, str]]:
    out, begin = [], start
    for i in range(start, end + 1):
        if i == end or seg[i] == ",":
            out.append((begin, seg[begin:i]))
            begin = i + 1
    return out


def _alt_regex(alt: str, line: int, col: int) -> str:
    if not alt:
        raise _fail("empty alternative in '{...}'", line, col, "write alternatives like {q,v}_proj")
    return "".join(_char_regex(alt, i, line, col) for i in range(len(alt)))


def _char_regex(text: str, i: int, line: int, col: int) -> str:
    ch = text[i]
    if ch == "*":
        if text[i + 1:i + 2] == "*":
            raise _fail("'**' must be a whole segment", line, col + i,
                        "write a.**.b for any number of segments")
        return r"[^.]*"
    if ch == ",":
        raise _fail("',' outside '{...}'", line, col + i, "alternatives are written {q,v}_proj")
    if ch == "-" or _WORD.match(ch):
        return re.escape(ch)
    raise _fail(f"unexpected character {ch!r} in pattern", line, col + i)


def _range_segment(seg: str, line: int, col: int) -> Segment:
    close = seg.index("]")
    if close != len(seg) - 1:
        raise _fail("a range must be a whole segment", line, col + close + 1,
                    "write it between dots, like layers.[0..3].attn")
    if close == 1:
        raise _fail("empty layer range '[]'", line, col, "write ranges like [0..3,7,10..11]")
    ranges = []
    for off, item in _alternatives(seg, 1, close):
        ranges.append(_range_item(item, line, col + off))
    merged = _merge(ranges)
    return Segment("range", seg, Pos(line, col, col + len(seg)), regex=_ranges_regex(merged),
                   indices=tuple(merged))


def _range_item(item: str, line: int, col: int) -> tuple[int, int]:
    if not item:
        raise _fail("empty item in layer range", line, col, "write ranges like [0..3,7,10..11]")
    lo_text, sep, hi_text = item.partition("..")
    lo = _index(lo_text, line, col)
    if not sep:
        return lo, lo
    hi = _index(hi_text, line, col + len(lo_text) + 2)
    if lo > hi:
        raise _fail(f"empty layer range {lo}..{hi}: the start is greater than the end", line, col,
                    f"write [{hi}..{lo}]")
    return lo, hi


def _index(text: str, line: int, col: int) -> int:
    for i, ch in enumerate(text):
        if not ("0" <= ch <= "9"):
            raise _fail(f"expected a layer index (a non-negative integer), got {ch!r}", line, col + i,
                        "write ranges like [0..3,7,10..11]")
    if not text:
        raise _fail("expected a layer index (a non-negative integer)", line, col,
                    "write ranges like [0..3,7,10..11]")
    if len(text) > MAX_INDEX_DIGITS:
        raise _fail("layer index too large", line, col)
    return int(text)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _ranges_regex(ranges: Iterable[tuple[int, int]]) -> str:
    """A regex for the decimal strings (no leading zeros) of the integers in ``ranges``."""
    alts = []
    for lo, hi in ranges:
        for digits in range(len(str(lo)), len(str(hi)) + 1):
            a = max(lo, 0 if digits == 1 else 10 ** (digits - 1))
            b = min(hi, 10 ** digits - 1)
            alts.extend(_same_length_regex(a, b, digits))
    return "(?:" + "|".join(alts) + ")"


def _same_length_regex(lo: int, hi: int, digits: int) -> list[str]:
    """Split [lo, hi] (numbers of ``digits`` digits) into pieces ``prefix[a-b]\\d{k}``."""
    out = []
    start = lo
    while start <= hi:
        k = 0
        while k + 1 < digits and start % 10 ** (k + 1) == 0 and start + 10 ** (k + 1) - 1 <= hi:
            k += 1
        step = 10 ** k
        digit = (start // step) % 10
        count = min(10 - digit, (hi - start + 1) // step)
        s = str(start)
        prefix = s[: digits - 1 - k]
        last = digit + count - 1
        mid = str(digit) if count == 1 else f"[{digit}-{last}]"
        out.append(prefix + mid + (r"\d" * k))
        start += count * step
    return out


# --------------------------------------------------------------------------- matching

class PatternMatcher:
    """A compiled pattern. ``matches(name)`` tests a full dotted module name (suffix semantics)."""

    def __init__(self, pattern: Pattern, regex: str, roles: tuple[str, ...] = ()):
        self.pattern = pattern
        self.regex = regex
        self.roles = roles  # role words that were expanded through aliases
        self._search = re.compile(regex).search

    def matches(self, name: str) -> bool:
        return self._search(name) is not None

    __call__ = matches

    def filter(self, names: Iterable[str]) -> list[str]:
        """The names this pattern matches, in order."""
        search = self._search
        return [n for n in names if search(n) is not None]

    def __repr__(self) -> str:
        return f"PatternMatcher({self.pattern.text!r}, regex={self.regex!r})"


def compile_pattern(pattern: Pattern | str,
                    aliases: Mapping[str, Sequence[str]] | None = None) -> PatternMatcher:
    """Compile ``pattern`` (or pattern text) to one regex over the dotted name, expanding role aliases."""
    if isinstance(pattern, str):
        pattern = parse_pattern(pattern)
    aliases = aliases or {}
    roles: list[str] = []
    units = []
    for seg in pattern.segments:
        if seg.is_plain and seg.text in aliases:
            roles.append(seg.text)
            units.append(("seg", _role_regex(seg.text, tuple(aliases[seg.text]))))
        else:
            units.append(_unit(seg))
    body = _join(_collapse(units), fragment=False)
    regex = r"(?:^|\.)" + body + "$" if body else ""
    return PatternMatcher(pattern, regex, tuple(roles))


def _unit(seg: Segment) -> tuple:
    if seg.kind == "globstar":
        return ("wild", 0, True)
    if seg.kind == "star":
        return ("wild", 1, False)
    if seg.regex:
        return ("seg", seg.regex)
    if seg.kind == "range":  # a Segment built by hand, without its regex
        return ("seg", _ranges_regex(_merge(list(seg.indices))))
    return ("seg", re.escape(seg.text))


def _collapse(units: list[tuple]) -> list[tuple]:
    """Merge runs of ``*``/``**`` into one ``("wild", at_least, unbounded)`` unit."""
    out: list[tuple] = []
    for u in units:
        if u[0] == "wild" and out and out[-1][0] == "wild":
            out[-1] = ("wild", out[-1][1] + u[1], out[-1][2] or u[2])
        else:
            out.append(u)
    return out


def _join(units: list[tuple], fragment: bool) -> str:
    """Regex for a unit sequence.

    A pattern drops a leading ``**`` (suffix semantics make it redundant) and may be empty
    (``**`` alone matches every name); a fragment keeps it and always spans one segment at least.
    """
    toks: list[str | None] = []  # None is a gap of zero or more segments
    for u in units:
        if u[0] == "seg":
            toks.append(u[1])
        else:
            toks.extend([_SEG] * u[1])
            if u[2]:
                toks.append(None)
    if toks and toks[0] is None and not fragment:
        toks.pop(0)
    if all(t is None for t in toks):
        return _SEG + _GAP if fragment else ""
    out, started = "", False
    for t in toks:
        if t is None:
            out += _GAP if started else r"(?:[^.]+\.)*"
        else:
            out += (r"\." if started else "") + t
            started = True
    return out


@functools.lru_cache(maxsize=512)
def _role_regex(role: str, fragments: tuple[str, ...]) -> str:
    alts = [re.escape(role)]
    for frag in fragments:
        try:
            pat = parse_pattern(frag)
        except SurgeryError as exc:
            from adapterhub.registry.errors import PluginError

            raise PluginError(f"alias fragment {frag!r} of role '{role}' is not a valid pattern: "
                              f"{exc.message}") from None
        regex = _join(_collapse([_unit(s) for s in pat.segments]), fragment=True)
        if regex not in alts:
            alts.append(regex)
    return "(?:" + "|".join(alts) + ")"


# --------------------------------------------------------------------------- did you mean

def nearest(name_text: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` full names from ``candidates`` closest to ``name_text`` (best first).

    Compares against each full name and against its last k segments (k = the number of segments
    of ``name_text``); one name per distinct close suffix comes first, so the list is not n
    copies of the same module in different layers.
    """
    query = re.sub(r"^(\*\*\.)+", "", name_text)
    k = query.count(".") + 1
    by_key: dict[str, list[str]] = {}
    for full in candidates:
        by_key.setdefault(full, []).append(full)
        segs = full.split(".")
        if len(segs) > k:
            by_key.setdefault(".".join(segs[-k:]), []).append(full)
    if not query or not by_key or n <= 0:
        return []
    keys = difflib.get_close_matches(query, list(by_key), n=max(n * 4, 10), cutoff=0.5)
    out: list[str] = []
    for fulls in [by_key[key][:1] for key in keys] + [by_key[key] for key in keys]:
        for full in fulls:
            if full not in out:
                out.append(full)
                if len(out) >= n:
                    return out
    return out
