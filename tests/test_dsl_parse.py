"""Parsing valid specs: statements, values, positions, defaults, line endings, the base header."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import adapterhub.dsl as dsl
from adapterhub.dsl import (
    Action,
    Call,
    Pattern,
    Pos,
    Rule,
    Spec,
    SurgeryError,
    Value,
    load_spec,
    parse,
    parse_file,
)

MUST_PARSE = [
    "attn.* -> lora(r=8) on nf4",
    "**.self_attn.{q,v}_proj -> lora(r=16, alpha=32, dropout=0.05)",
    "lm_head -> train",
    "mlp.* -> freeze on int8",
    "x -> skip",
]


@pytest.mark.parametrize("line", MUST_PARSE)
def test_must_parse_lines(line):
    spec = parse(line + "\n")
    assert len(spec.rules) == 1
    rule = spec.rules[0]
    assert isinstance(rule, Rule)
    assert rule.text == line
    assert rule.line == 1
    assert rule.pattern.text == line.split(" ->")[0]


def test_must_parse_details():
    rules = parse("\n".join(MUST_PARSE)).rules
    first = rules[0]
    assert first.action == Action("variant", Pos(1, 11, 15), first.action.call)
    assert first.action.call.name == "lora"
    assert first.action.call.kwargs() == {"r": 8}
    assert first.quant == Call("nf4", (), Pos(1, 24, 27))
    assert rules[1].action.call.kwargs() == {"r": 16, "alpha": 32, "dropout": 0.05}
    assert rules[1].quant is None
    assert [r.action.kind for r in rules] == ["variant", "variant", "train", "freeze", "skip"]
    assert rules[3].quant.name == "int8"
    assert rules[3].action.call is None
    assert [r.line for r in rules] == [1, 2, 3, 4, 5]


def test_base_header():
    spec = parse('base "meta-llama/Llama-2-7b-hf"\nattn.* -> lora\n')
    assert spec.base == "meta-llama/Llama-2-7b-hf"
    assert len(spec.rules) == 1
    assert parse("x -> lora").base is None


def test_base_header_after_defaults_and_comments():
    spec = parse('# hello\n\ndefaults lora(r=4)\nbase "a/b"  # trailing\nx -> lora\n')
    assert spec.base == "a/b"


def test_module_named_like_a_keyword_is_a_pattern():
    spec = parse("base -> lora\ndefaults -> skip\nskip -> train\non -> freeze\ntrain.x -> lora")
    assert [r.pattern.text for r in spec.rules] == ["base", "defaults", "skip", "on", "train.x"]


def test_comments_blank_lines_and_whitespace():
    text = "# a comment\n\n   \n\tattn.* -> lora(r=8)   # trailing comment\n# end\n   "
    spec = parse(text)
    assert len(spec.rules) == 1
    assert spec.rules[0].line == 4
    assert spec.rules[0].text == "attn.* -> lora(r=8)   # trailing comment"
    assert spec.rules[0].pattern.pos == Pos(4, 2, 8)


def test_empty_spec():
    for text in ("", "\n", "# only a comment", "\n\n# c\n\n"):
        spec = parse(text)
        assert spec.rules == () and spec.base is None and spec.defaults == ()


def test_crlf_and_missing_final_newline():
    lf = parse("x -> lora(r=8)\ny -> skip")
    crlf = parse("x -> lora(r=8)\r\ny -> skip\r\n")
    assert [r.text for r in lf.rules] == [r.text for r in crlf.rules] == ["x -> lora(r=8)", "y -> skip"]
    assert [r.pattern.pos for r in crlf.rules] == [Pos(1, 1, 2), Pos(2, 1, 2)]
    assert crlf.rules[0].action.call.args[0].value.pos == Pos(1, 13, 14)


def test_utf8_bom_is_ignored():
    spec = parse("\ufeffx -> lora")
    assert spec.rules[0].pattern.pos.column == 1


def test_all_value_kinds():
    spec = parse('x -> v(a=8, b=-3, c=0.05, d=1e-4, e=-0.5, f=true, g=false, h="s", i=kaiming, '
                 'j=[1, 2, "a"], k=[], l=[[1], []], m=.5, n=2E3, o=[1, 2,])')
    args = {a.name: a.value for a in spec.rules[0].action.call.args}
    kinds = {k: v.kind for k, v in args.items()}
    assert kinds == {"a": "int", "b": "int", "c": "float", "d": "float", "e": "float", "f": "bool",
                     "g": "bool", "h": "string", "i": "ident", "j": "list", "k": "list", "l": "list",
                     "m": "float", "n": "float", "o": "list"}
    py = spec.rules[0].action.call.kwargs()
    assert py == {"a": 8, "b": -3, "c": 0.05, "d": 1e-4, "e": -0.5, "f": True, "g": False, "h": "s",
                  "i": "kaiming", "j": [1, 2, "a"], "k": [], "l": [[1], []], "m": 0.5, "n": 2000.0,
                  "o": [1, 2]}
    assert isinstance(py["a"], int) and isinstance(py["f"], bool)
    assert args["j"].text == '[1, 2, "a"]'
    assert args["d"].text == "1e-4"


def test_keywords_as_identifier_values():
    call = parse("x -> v(a=on, b=skip, c=base, d=train)").rules[0].action.call
    assert call.kwargs() == {"a": "on", "b": "skip", "c": "base", "d": "train"}
    assert {a.value.kind for a in call.args} == {"ident"}


def test_string_escapes():
    text = r'x -> v(a="q\"x", b="back\\slash", c="tab\there", d="\u00e9", e="n\n")'
    call = parse(text).rules[0].action.call
    assert call.kwargs() == {"a": 'q"x', "b": "back\\slash", "c": "tab\there", "d": "é", "e": "n\n"}


def test_value_and_argument_positions():
    spec = parse("\n\n  attn.* -> lora(r=16,  init=kaiming) on int4(group=32)")
    rule = spec.rules[0]
    assert rule.line == 3
    r, init = rule.action.call.args
    assert r.pos == Pos(3, 18, 19) and r.value.pos == Pos(3, 20, 22)
    assert init.pos == Pos(3, 25, 29) and init.value == Value("ident", "kaiming", "kaiming", Pos(3, 30, 37))
    assert rule.quant.pos == Pos(3, 42, 46)
    assert rule.quant.args[0].value.value == 32


def test_pattern_segments():
    pattern = parse("layers.[0..3,7].self_attn.{q,v}_proj -> lora").rules[0].pattern
    assert isinstance(pattern, Pattern)
    kinds = [s.kind for s in pattern.segments]
    assert kinds == ["literal", "range", "literal", "literal"]
    rng = pattern.segments[1]
    assert rng.indices == ((0, 3), (7, 7)) and rng.pos == Pos(1, 8, 16)
    assert pattern.segments[3].regex == "(?:q|v)_proj"
    assert pattern.segments[0].is_plain and not pattern.segments[3].is_plain


def test_defaults_lines():
    spec = parse("defaults lora(r=8, alpha=16)\ndefaults nf4()\nx -> lora\ndefaults lora(r=4)\n")
    assert [d.name for d in spec.defaults] == ["lora", "nf4", "lora"]
    assert spec.defaults[0].kwargs() == {"r": 8, "alpha": 16}
    assert spec.defaults[0].pos == Pos(1, 10, 14)
    assert spec.defaults[2].pos.line == 4
    assert len(spec.rules) == 1


def test_bare_call_and_empty_parens():
    a, b = parse("x -> lora\ny -> lora()").rules
    assert a.action.call.args == () and b.action.call.args == ()
    assert parse("x -> lora(r=8,)").rules[0].action.call.kwargs() == {"r": 8}


def test_spec_keeps_source_and_filename():
    text = "x -> lora\n"
    spec = parse(text, filename="my.surgery")
    assert spec.source == text and spec.filename == "my.surgery"


def test_parse_file_and_load_spec(tmp_path):
    path = tmp_path / "a.surgery"
    path.write_text('base "m/x"\r\nattn.* -> lora(r=8) on nf4\r\n', encoding="utf-8")
    spec = parse_file(path)
    assert spec.filename == str(path) and spec.base == "m/x"
    assert load_spec(path) == spec
    assert load_spec(str(path)) == spec
    assert load_spec(spec) is spec
    text_spec = load_spec("attn.* -> lora(r=8)")
    assert text_spec.rules[0].text == "attn.* -> lora(r=8)"
    other = tmp_path / "spec.txt"
    other.write_text("x -> skip", encoding="utf-8")
    assert load_spec(str(other)).filename == str(other)


def test_parse_file_strips_bom(tmp_path):
    path = tmp_path / "bom.surgery"
    path.write_bytes("\ufeffx -> lora\n".encode())
    assert parse_file(path).rules[0].pattern.pos == Pos(1, 1, 2)


def test_rule_text_is_stripped_source_line():
    spec = parse("   x -> lora(r=8)   \n")
    assert spec.rules[0].text == "x -> lora(r=8)"


def test_surgery_error_is_raised_not_lark():
    with pytest.raises(SurgeryError):
        parse("x -> lora(")


def test_public_names():
    for name in ("parse", "parse_file", "load_spec", "bind_spec", "BoundRule", "SurgeryError",
                 "compile_pattern", "PatternMatcher", "nearest", "Spec", "Rule", "Pattern", "Segment",
                 "Action", "Call", "Arg", "Value", "Pos"):
        assert hasattr(dsl, name), name
    assert Spec is dsl.Spec


_ISOLATED_IMPORT = textwrap.dedent("""
    import importlib.util, sys, types
    root = sys.argv[1]
    # Load adapterhub.dsl without running adapterhub/__init__ or adapterhub/registry/__init__
    # (they belong to other parts of the project); only dsl's own imports are measured.
    for name, folder in (("adapterhub", "hub"), ("adapterhub.registry", "registry")):
        mod = types.ModuleType(name)
        mod.__path__ = [root + "/" + folder]
        sys.modules[name] = mod
    import adapterhub.dsl
    adapterhub.dsl.parse("attn.* -> lora(r=8) on nf4")
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "transformers"))
    print(",".join(heavy))
""")


def test_dsl_itself_does_not_import_torch():
    root = str(Path(dsl.__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", _ISOLATED_IMPORT, root], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert out.stdout.strip() == ""


_FULL_IMPORT = "import sys, adapterhub.dsl; print('torch' in sys.modules)"
_REGISTRY_IMPORT = "import sys, adapterhub.registry.errors; print('torch' in sys.modules)"


def _imports_torch(code: str) -> bool:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def test_import_adapterhub_dsl_is_light():
    if _imports_torch(_REGISTRY_IMPORT):
        pytest.skip("adapterhub.registry's __init__ imports torch (registry.base); dsl itself does not")
    assert not _imports_torch(_FULL_IMPORT)
