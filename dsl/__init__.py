"""adapterhub.dsl: the ``.surgery`` language -- grammar, parser, errors, patterns and binding.

    >>> spec = parse("attn.* -> lora(r=8) on nf4")
    >>> spec.rules[0].action.call.kwargs()
    {'r': 8}
"""

from .ast import Action, Arg, Call, Pattern, Pos, Rule, Segment, Spec, Value
from .binding import BoundRule, bind_spec
from .errors import SurgeryError
from .parser import load_spec, parse, parse_file
from .patterns import PatternMatcher, compile_pattern, nearest, parse_pattern

__all__ = [
    "Action", "Arg", "Call", "Pattern", "Pos", "Rule", "Segment", "Spec", "Value",
    "BoundRule", "bind_spec", "SurgeryError", "load_spec", "parse", "parse_file",
    "PatternMatcher", "compile_pattern", "nearest", "parse_pattern",
]
