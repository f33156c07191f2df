"""Golden tests: each malformed spec gives exactly this message, place, caret and hint.

The registry is a fake one built from a plugin object, so the tests do not depend on the
built-in plugins: a ``lora``-like and a ``dora``-like variant, ``nf4``/``int8``/``int4`` quantizers.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Literal

import pluggy
import pytest

import adapterhub.registry.hookspecs as hookspecs
from adapterhub.dsl import SurgeryError, bind_spec, load_spec, parse, parse_file
from adapterhub.registry import Quantizer, Variant, hookimpl, param
from adapterhub.registry.errors import AdapterhubError
from adapterhub.registry.manager import build_registry


@dataclass(frozen=True)
class LoraParams:
    r: int = param(8, "rank", positive=True)
    alpha: float = param(16.0, "scale numerator")
    dropout: float = param(0.0, "dropout probability", min=0.0, max=0.999)
    rslora: bool = param(False, "rank-stabilised scaling")
    init: Literal["kaiming", "gaussian"] = param("kaiming", "how A is initialised")


@dataclass(frozen=True)
class DoraParams:
    r: int = param(8, "rank", positive=True)


@dataclass(frozen=True)
class NoParams:
    pass


@dataclass(frozen=True)
class Int4Params:
    group: int = param(64, "group size", positive=True)


class FakeLora(Variant):
    name = "lora"
    Params = LoraParams


class FakeDora(Variant):
    name = "dora"
    Params = DoraParams


class FakeNf4(Quantizer):
    name = "nf4"
    Params = NoParams


class FakeInt8(Quantizer):
    name = "int8"
    Params = NoParams


class FakeInt4(Quantizer):
    name = "int4"
    Params = Int4Params


class FakePlugin:
    @hookimpl
    def register_variants(self, register):
        register(FakeLora)
        register(FakeDora)

    @hookimpl
    def register_quantizers(self, register):
        register(FakeNf4)
        register(FakeInt8)
        register(FakeInt4)


@pytest.fixture(scope="module")
def registry():
    pm = pluggy.PluginManager("adapterhub")
    pm.add_hookspecs(hookspecs)
    pm.register(FakePlugin(), name="fake")
    return build_registry(pm)


def check(source: str, registry) -> SurgeryError:
    with pytest.raises(SurgeryError) as info:
        bind_spec(parse(source, "spec.surgery"), registry)
    return info.value


GOLDEN = [
    ("missing_arrow", "attn.* lora(r=8)\n", [
        "spec.surgery:1:8: error: expected '->', got 'lora'",
        "    attn.* lora(r=8)",
        "           ^",
        "hint: a rule reads PATTERN -> ACTION [on QUANT], e.g. attn.* -> lora(r=8) on nf4",
    ]),
    ("arrow_typo", "attn.* => lora\n", [
        "spec.surgery:1:8: error: expected '->', got '='",
        "    attn.* => lora",
        "           ^",
        "hint: write '->' (a hyphen and '>') between the pattern and the action",
    ]),
    ("missing_value", "attn.* -> lora(r=)\n", [
        "spec.surgery:1:18: error: expected a value, got ')'",
        "    attn.* -> lora(r=)",
        "                     ^",
        "hint: give the argument a value, e.g. r=8",
    ]),
    ("unclosed_paren", "attn.* -> lora(r=8\n", [
        "spec.surgery:1:19: error: expected ',' or ')', got end of line",
        "    attn.* -> lora(r=8",
        "                      ^",
        "hint: close the argument list with ')'",
    ]),
    ("unclosed_paren_eof", "# first\nattn.* -> lora(r=8, alpha=16", [
        "spec.surgery:2:29: error: expected ',' or ')', got end of line",
        "    attn.* -> lora(r=8, alpha=16",
        "                                ^",
        "hint: close the argument list with ')'",
    ]),
    ("unterminated_string", "base \"meta-llama/Llama-2\n", [
        "spec.surgery:1:6: error: unterminated string",
        "    base \"meta-llama/Llama-2",
        "         ^",
        "hint: close the string with '\"' on the same line",
    ]),
    ("single_quotes", "attn.* -> lora(init='kaiming')\n", [
        "spec.surgery:1:21: error: expected a value, got \"'\"",
        "    attn.* -> lora(init='kaiming')",
        "                        ^",
        "hint: strings use double quotes: \"...\"",
    ]),
    ("on_without_quantizer", "attn.* -> lora(r=8) on\n", [
        "spec.surgery:1:23: error: expected a name, got end of line",
        "    attn.* -> lora(r=8) on",
        "                          ^",
        "hint: name a quantizer after 'on', e.g. on nf4",
    ]),
    ("stray_paren", "attn.* -> lora) on nf4\n", [
        "spec.surgery:1:15: error: expected '(' or 'on' or end of line, got ')'",
        "    attn.* -> lora) on nf4",
        "                  ^",
        "hint: after the action only an 'on QUANT' clause or a '#' comment may follow",
    ]),
    ("stray_characters", "attn.* -> lora(r=8) !!\n", [
        "spec.surgery:1:21: error: expected 'on' or end of line, got '!'",
        "    attn.* -> lora(r=8) !!",
        "                        ^",
        "hint: after the action only an 'on QUANT' clause or a '#' comment may follow",
    ]),
    ("no_pattern", "-> lora\n", [
        "spec.surgery:1:1: error: expected a pattern, got '->'",
        "    -> lora",
        "    ^",
        "hint: a rule starts with a module pattern, e.g. attn.* -> lora(r=8)",
    ]),
    ("missing_action", "attn.* ->\n", [
        "spec.surgery:1:10: error: expected an action (a variant, skip, train or freeze), got end of line",
        "    attn.* ->",
        "             ^",
        "hint: after '->' name a variant such as lora(r=8), or skip, train or freeze",
    ]),
    ("positional_arg", "attn.* -> lora(8)\n", [
        "spec.surgery:1:16: error: expected a name or ')', got '8'",
        "    attn.* -> lora(8)",
        "                   ^",
        "hint: arguments are named: write name=value, e.g. lora(r=8)",
    ]),
    ("missing_comma", "attn.* -> lora(r=8 alpha=16)\n", [
        "spec.surgery:1:20: error: expected ',' or ')', got 'alpha'",
        "    attn.* -> lora(r=8 alpha=16)",
        "                       ^",
        "hint: separate arguments with ','",
    ]),
    ("unclosed_list", "attn.* -> lora(targets=[1, 2)\n", [
        "spec.surgery:1:29: error: expected ',' or ']', got ')'",
        "    attn.* -> lora(targets=[1, 2)",
        "                                ^",
        "hint: close the list with ']'",
    ]),
    ("skip_args", "x -> skip(r=1)\n", [
        "spec.surgery:1:10: error: expected 'on' or end of line, got '('",
        "    x -> skip(r=1)",
        "             ^",
        "hint: skip, train and freeze take no arguments",
    ]),
    ("two_on", "x -> lora on nf4 on int8\n", [
        "spec.surgery:1:18: error: expected end of line, got 'on'",
        "    x -> lora on nf4 on int8",
        "                     ^",
        "hint: only one 'on' clause is allowed per rule",
    ]),
    ("unquoted_base", "base meta-llama/Llama-2-7b-hf\n", [
        "spec.surgery:1:6: error: expected '->' or a string, got 'meta'",
        "    base meta-llama/Llama-2-7b-hf",
        "         ^",
        "hint: quote the model id: base \"org/name\"",
    ]),
    ("defaults_without_args", "defaults lora\n", [
        "spec.surgery:1:14: error: expected '(', got end of line",
        "    defaults lora",
        "                 ^",
        "hint: defaults needs arguments: defaults lora(r=8, alpha=16)",
    ]),
    ("duplicate_arg", "attn.* -> lora(r=8, r=4)\n", [
        "spec.surgery:1:21: error: duplicate argument 'r' in lora(...)",
        "    attn.* -> lora(r=8, r=4)",
        "                        ^",
        "hint: 'r' is already given at column 16",
    ]),
    ("two_base_headers", "base \"a/b\"\nbase \"c/d\"\n", [
        "spec.surgery:2:1: error: a second 'base' header",
        "    base \"c/d\"",
        "    ^",
        "hint: the first one is on line 1",
    ]),
    ("base_after_rule", "x -> lora\nbase \"a/b\"\n", [
        "spec.surgery:2:1: error: 'base' must come before the first rule",
        "    base \"a/b\"",
        "    ^",
        "hint: move it above line 1",
    ]),
    ("bad_range", "layers.[5..2].attn -> lora\n", [
        "spec.surgery:1:9: error: empty layer range 5..2: the start is greater than the end",
        "    layers.[5..2].attn -> lora",
        "            ^",
        "hint: write [2..5]",
    ]),
    ("bad_range_item", "layers.[0..x].attn -> lora\n", [
        "spec.surgery:1:12: error: expected a layer index (a non-negative integer), got 'x'",
        "    layers.[0..x].attn -> lora",
        "               ^",
        "hint: write ranges like [0..3,7,10..11]",
    ]),
    ("unbalanced_brace", "self_attn.{q,v_proj -> lora\n", [
        "spec.surgery:1:11: error: unclosed '{'",
        "    self_attn.{q,v_proj -> lora",
        "              ^",
        "hint: add the missing '}'",
    ]),
    ("empty_alternative", "self_attn.{q,}_proj -> lora\n", [
        "spec.surgery:1:14: error: empty alternative in '{...}'",
        "    self_attn.{q,}_proj -> lora",
        "                 ^",
        "hint: write alternatives like {q,v}_proj",
    ]),
    ("empty_segment", "model..q_proj -> lora\n", [
        "spec.surgery:1:7: error: empty segment in pattern",
        "    model..q_proj -> lora",
        "          ^",
        "hint: two dots in a row, or a dot at the start or end; write 'a.b', 'a.*.b' or 'a.**.b'",
    ]),
    ("triple_star", "model.***.q_proj -> lora\n", [
        "spec.surgery:1:7: error: '***' is not a pattern segment",
        "    model.***.q_proj -> lora",
        "          ^",
        "hint: use '*' for exactly one segment or '**' for any number of segments",
    ]),
    ("range_not_whole_segment", "layers[0..3].attn -> lora\n", [
        "spec.surgery:1:7: error: a range must be a whole segment",
        "    layers[0..3].attn -> lora",
        "          ^",
        "hint: write it between dots, like layers.[0..3].attn",
    ]),
    ("bad_escape", "base \"a\\qb\"\n", [
        "spec.surgery:1:8: error: unknown escape '\\q' in string",
        "    base \"a\\qb\"",
        "           ^",
        "hint: write '\\\\' for a backslash",
    ]),
    ("unknown_variant", "attn.* -> lroa(r=8)\n", [
        "spec.surgery:1:11: error: unknown variant 'lroa'",
        "    attn.* -> lroa(r=8)",
        "              ^",
        "hint: did you mean 'lora'? known variants: dora, lora",
    ]),
    ("unknown_quantizer", "attn.* -> lora on nf5\n", [
        "spec.surgery:1:19: error: unknown quantizer 'nf5'",
        "    attn.* -> lora on nf5",
        "                      ^",
        "hint: did you mean 'nf4'? known quantizers: int4, int8, nf4",
    ]),
    ("unknown_param_close", "attn.* -> lora(alpah=8)\n", [
        "spec.surgery:1:16: error: lora has no parameter 'alpah'; did you mean 'alpha'? (parameters: r,"
            " alpha, dropout, rslora, init)",
        "    attn.* -> lora(alpah=8)",
        "                   ^",
    ]),
    ("unknown_param_prefix", "attn.* -> lora(rank=8)\n", [
        "spec.surgery:1:16: error: lora has no parameter 'rank' (parameters: r, alpha, dropout, rslora,"
            " init)",
        "    attn.* -> lora(rank=8)",
        "                   ^",
        "hint: did you mean 'r'?",
    ]),
    ("r_word", "attn.* -> lora(r=eight)\n", [
        "spec.surgery:1:18: error: r must be a positive int, got 'eight'",
        "    attn.* -> lora(r=eight)",
        "                     ^",
    ]),
    ("r_zero", "attn.* -> lora(r=0)\n", [
        "spec.surgery:1:18: error: r must be a positive int, got 0",
        "    attn.* -> lora(r=0)",
        "                     ^",
    ]),
    ("r_negative", "attn.* -> lora(r=-2)\n", [
        "spec.surgery:1:18: error: r must be a positive int, got -2",
        "    attn.* -> lora(r=-2)",
        "                     ^",
    ]),
    ("dropout_string", "attn.* -> lora(dropout=\"x\")\n", [
        "spec.surgery:1:24: error: dropout must be a float, got 'x'",
        "    attn.* -> lora(dropout=\"x\")",
        "                           ^",
    ]),
    ("dropout_range", "attn.* -> lora(dropout=1.5)\n", [
        "spec.surgery:1:24: error: dropout must be <= 0.999, got 1.5",
        "    attn.* -> lora(dropout=1.5)",
        "                           ^",
    ]),
    ("literal_typo", "attn.* -> lora(init=kaimng)\n", [
        "spec.surgery:1:21: error: init must be one of kaiming, gaussian, got 'kaimng'; did you mean"
            " 'kaiming'?",
        "    attn.* -> lora(init=kaimng)",
        "                        ^",
    ]),
    ("bool_type", "attn.* -> lora(rslora=1)\n", [
        "spec.surgery:1:23: error: rslora must be a bool, got 1",
        "    attn.* -> lora(rslora=1)",
        "                          ^",
    ]),
    ("skip_on", "x -> skip on nf4\n", [
        "spec.surgery:1:14: error: 'skip' cannot have an 'on' clause: skip leaves the module untouched",
        "    x -> skip on nf4",
        "                 ^",
        "hint: to quantize a frozen module write freeze on nf4",
    ]),
    ("train_on", "x -> train on int8\n", [
        "spec.surgery:1:15: error: 'train' cannot have an 'on' clause: train trains the module in full"
            " precision",
        "    x -> train on int8",
        "                  ^",
        "hint: to quantize a frozen module write freeze on int8",
    ]),
    ("quantizer_as_variant", "x -> nf4\n", [
        "spec.surgery:1:6: error: 'nf4' is a quantizer, not an adapter variant",
        "    x -> nf4",
        "         ^",
        "hint: quantize with an 'on' clause: freeze on nf4, or lora(r=8) on nf4",
    ]),
    ("variant_as_quantizer", "x -> lora on lora\n", [
        "spec.surgery:1:14: error: 'lora' is an adapter variant, not a quantizer",
        "    x -> lora on lora",
        "                 ^",
        "hint: put the variant after '->': PATTERN -> lora on nf4",
    ]),
    ("quant_param", "x -> freeze on int4(group=0)\n", [
        "spec.surgery:1:27: error: group must be a positive int, got 0",
        "    x -> freeze on int4(group=0)",
        "                              ^",
    ]),
    ("unknown_defaults", "defaults loar(r=4)\n", [
        "spec.surgery:1:10: error: unknown variant or quantizer 'loar' in defaults",
        "    defaults loar(r=4)",
        "             ^",
        "hint: did you mean 'lora'? known variants and quantizers: dora, int4, int8, lora, nf4",
    ]),
    ("defaults_bad_value", "defaults lora(r=0)\nx -> lora\n", [
        "spec.surgery:1:17: error: r must be a positive int, got 0",
        "    defaults lora(r=0)",
        "                    ^",
    ]),
    ("error_on_later_line",
     "# spec\nbase \"m/x\"\n\nattn.* -> lora(r=8)\nmlp.* -> lora(r=8) on nf4 on int8\n", [
        "spec.surgery:5:27: error: expected end of line, got 'on'",
        "    mlp.* -> lora(r=8) on nf4 on int8",
        "                              ^",
        "hint: only one 'on' clause is allowed per rule",
    ]),
    ("tab_indent", "\tattn.* -> lora(r=\t)\n", [
        "spec.surgery:1:20: error: expected a value, got ')'",
        "    \tattn.* -> lora(r=\t)",
        "    \t                 \t^",
        "hint: give the argument a value, e.g. r=8",
    ]),
    ("crlf", "x -> lora\r\ny -> lora(r=)\r\n", [
        "spec.surgery:2:13: error: expected a value, got ')'",
        "    y -> lora(r=)",
        "                ^",
        "hint: give the argument a value, e.g. r=8",
    ]),
]


def test_at_least_twenty_goldens():
    assert len(GOLDEN) >= 20
    assert len({name for name, _, _ in GOLDEN}) == len(GOLDEN)


@pytest.mark.parametrize("name,source,expected", GOLDEN, ids=[g[0] for g in GOLDEN])
def test_golden_message(name, source, expected, registry):
    err = check(source, registry)
    assert str(err) == "\n".join(expected)
    # the attributes agree with the rendering
    head = expected[0]
    assert head.startswith(f"spec.surgery:{err.line}:{err.column}: error: {err.message}")
    assert expected[1] == ("    " + err.source_line).rstrip()
    assert isinstance(err, AdapterhubError)


def test_caret_sits_under_the_column(registry):
    err = check("attn.* -> lora) on nf4\n", registry)
    caret = str(err).split("\n")[2]
    assert caret.index("^") - 4 == err.column - 1
    assert err.source_line[err.column - 1] == ")"


def test_error_survives_pickling(registry):
    err = check("attn.* -> lroa\n", registry)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err)
    assert (again.line, again.column, again.hint) == (err.line, err.column, err.hint)


def test_default_filename_is_spec():
    with pytest.raises(SurgeryError) as info:
        parse("x lora")
    assert str(info.value).startswith("<spec>:1:3: error: expected '->'")


def test_lists_nested_too_deep_is_an_error():
    source = "x -> lora(a=" + "[" * 200 + "]" * 200 + ")"
    with pytest.raises(SurgeryError) as info:
        parse(source)
    assert "nested" in info.value.message
    assert info.value.line == 1 and info.value.column > 12


def test_huge_integer_is_an_error_not_a_crash():
    with pytest.raises(SurgeryError) as info:
        parse("x -> lora(r=" + "9" * 5000 + ")")
    assert info.value.message == "integer too large"
    assert info.value.column == 13


def test_lone_carriage_return():
    with pytest.raises(SurgeryError) as info:
        parse("x -> lora\ry -> skip\n")
    assert info.value.message.startswith("stray carriage return")
    assert (info.value.line, info.value.column) == (1, 10)


def test_missing_file(tmp_path):
    with pytest.raises(AdapterhubError, match="spec file not found"):
        parse_file(tmp_path / "nope.surgery")
    with pytest.raises(AdapterhubError, match="spec file not found"):
        load_spec(str(tmp_path / "nope.surgery"))


def test_directory_is_not_a_spec(tmp_path):
    with pytest.raises(AdapterhubError, match="directory"):
        parse_file(tmp_path)


def test_file_not_utf8(tmp_path):
    path = tmp_path / "bad.surgery"
    path.write_bytes(b"x -> lora\ny -> lora(init=\"caf\xe9\")\n")
    with pytest.raises(SurgeryError) as info:
        parse_file(path)
    err = info.value
    assert err.message == "the file is not valid UTF-8 (byte 0xe9)"
    assert (err.line, err.column) == (2, 20)
    assert err.filename == str(path)


def test_file_errors_name_the_file(tmp_path, registry):
    path = tmp_path / "my.surgery"
    path.write_text("attn.* -> lora(r=8)\nmlp.* -> lora(r=eight)\n", encoding="utf-8")
    spec = parse_file(path)
    with pytest.raises(SurgeryError) as info:
        bind_spec(spec, registry)
    assert str(info.value).startswith(f"{path}:2:17: error: r must be a positive int, got 'eight'")


def test_post_init_failure_is_reported_at_the_call():
    @dataclass(frozen=True)
    class Picky:
        r: int = param(8, "rank", positive=True)
        alpha: float = param(16.0, "scale")

        def __post_init__(self):
            if self.alpha < self.r:
                raise ValueError("alpha must be at least r")

    class PickyVariant:
        name = "picky"
        Params = Picky

    class Reg:
        variants = {"picky": PickyVariant()}
        quantizers: dict = {}

    with pytest.raises(SurgeryError) as info:
        bind_spec(parse("x -> picky(r=32, alpha=1)"), Reg())
    assert info.value.message == "picky: alpha must be at least r"
    assert info.value.column == 6


def test_variant_without_params_rejects_arguments():
    class Bare:
        name = "bare"
        Params = None

    class Reg:
        variants = {"bare": Bare()}
        quantizers: dict = {}

    assert bind_spec(parse("x -> bare"), Reg())[0].params is None
    with pytest.raises(SurgeryError, match="bare takes no parameters"):
        bind_spec(parse("x -> bare(k=1)"), Reg())


def test_binding_against_the_built_in_registry():
    from adapterhub.registry import get_registry

    registry = get_registry()
    spec = parse("defaults lora(r=4)\nattn.* -> lora(alpha=16) on nf4\n"
                 "**.self_attn.{q,v}_proj -> lora(r=16, alpha=32, dropout=0.05)\n"
                 "lm_head -> train\nmlp.* -> freeze on int8\nx -> skip\n")
    bound = bind_spec(spec, registry)
    assert [b.index for b in bound] == [0, 1, 2, 3, 4]
    assert bound[0].variant is registry.variants["lora"]
    assert (bound[0].params.r, bound[0].params.alpha) == (4, 16.0)
    assert bound[0].quantizer is registry.quantizers["nf4"]
    assert bound[1].params.r == 16 and bound[1].quantizer is None
    assert bound[2].variant is None and bound[2].params is None
    assert bound[3].quantizer is registry.quantizers["int8"] and bound[3].variant is None
    with pytest.raises(SurgeryError, match="did you mean 'lora'"):
        bind_spec(parse("x -> lroa(r=8)"), registry)
    with pytest.raises(SurgeryError, match="r must be a positive int, got 'eight'"):
        bind_spec(parse("x -> lora(r=eight)"), registry)
