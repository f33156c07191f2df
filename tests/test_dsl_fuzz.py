"""Property tests: whatever the input, parse + bind_spec succeed or raise a located SurgeryError.

Never a lark exception, IndexError, ValueError, RecursionError, ... and never the parser's
"internal error" fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Literal

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapterhub.dsl import SurgeryError, bind_spec, compile_pattern, parse
from adapterhub.registry import param


@dataclass(frozen=True)
class LoraParams:
    r: int = param(8, "rank", positive=True)
    alpha: float = param(16.0, "scale numerator")
    dropout: float = param(0.0, "dropout probability", min=0.0, max=0.999)
    rslora: bool = param(False, "rank-stabilised scaling")
    init: Literal["kaiming", "gaussian"] = param("kaiming", "how A is initialised")
    targets: list[int] = param([], "a list parameter")


@dataclass(frozen=True)
class GroupParams:
    group: int = param(64, "group size", positive=True)


@dataclass(frozen=True)
class NoParams:
    pass


REGISTRY = SimpleNamespace(
    variants={"lora": SimpleNamespace(name="lora", Params=LoraParams)},
    quantizers={"nf4": SimpleNamespace(name="nf4", Params=NoParams),
                "int8": SimpleNamespace(name="int8", Params=NoParams),
                "int4": SimpleNamespace(name="int4", Params=GroupParams)},
)

CORPUS = [
    'base "meta-llama/Llama-2-7b-hf"\n# adapters\ndefaults lora(r=8, alpha=16)\n\n'
    "attn.* -> lora(r=8) on nf4\n",
    "**.self_attn.{q,v}_proj -> lora(r=16, alpha=32, dropout=0.05)\nlm_head -> train\n",
    "mlp.* -> freeze on int8\r\nx -> skip\r\n",
    "layers.[0..3,7,10..11].attn.* -> lora(init=kaiming, targets=[1, 2, 3], rslora=true) on int4(group=32)",
    '  # comment only\n\n\tembed -> lora(r=4, init="gaussian")   # trailing\n'
    "h.[0..11].mlp.*_proj -> lora\n",
    "defaults int4(group=16)\nlayers.*.mlp.** -> freeze on int4\nmodel.layers.0.self_attn.q_proj -> lora()\n",
]

ALPHABET = st.sampled_from(list("abqvxr_.*{}[],0123456789()=\"'#-> \t\n\r\\!$;:") +
                           ["->", "on", "skip", "train", "freeze", "lora", "nf4", "base", "defaults",
                            "true", "..", "é", "\u2028", "\x00", "\ufeff", "\x0b", "日本"])
TOKENS = ["->", "(", ")", ",", "=", "[", "]", "{", "}", "..", "*", "**", ".", "on", "skip", "lora", "nf4",
          '"', '"x"', "8", "-1", "1e-4", "true", "\n", "\r\n", " ", "#", "base", "defaults", "[0..3]", "é"]

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check(text: str) -> None:
    try:
        spec = parse(text, "fuzz.surgery")
        bound = bind_spec(spec, REGISTRY)
        for rule in spec.rules:
            compile_pattern(rule.pattern, {"attn": ["self_attn", "layer.*.output"]}).matches("a.b.c")
    except SurgeryError as err:
        lines = text.removeprefix("\ufeff").split("\n")
        assert err.line >= 1 and err.column >= 1
        assert err.line <= len(lines) + 1
        assert err.column <= len(err.source_line) + 1, (err.column, err.source_line)
        assert not err.message.startswith("internal error"), err.message
        rendered = str(err)
        assert rendered.startswith(f"fuzz.surgery:{err.line}:{err.column}: error: ")
        assert "^" in rendered
    else:
        assert len(bound) == len(spec.rules)
        assert all(r.line >= 1 for r in spec.rules)


@FUZZ
@given(st.text(max_size=200))
def test_random_unicode_text(text):
    check(text)


@FUZZ
@given(st.lists(ALPHABET, max_size=60).map("".join))
def test_random_text_from_the_grammar_alphabet(text):
    check(text)


@st.composite
def mutated(draw):
    text = draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["insert", "delete", "replace", "swap", "truncate", "token"]))
        i = draw(st.integers(0, len(text)))
        if op == "insert":
            text = text[:i] + draw(ALPHABET) + text[i:]
        elif op == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 5)):]
        elif op == "replace":
            text = text[:i] + draw(ALPHABET) + text[i + 1:]
        elif op == "truncate":
            text = text[:i]
        elif op == "token":
            text = text[:i] + draw(st.sampled_from(TOKENS)) + text[i:]
        else:
            parts = text.split(" ")
            if len(parts) > 1:
                a = draw(st.integers(0, len(parts) - 1))
                b = draw(st.integers(0, len(parts) - 1))
                parts[a], parts[b] = parts[b], parts[a]
                text = " ".join(parts)
    return text


@FUZZ
@given(mutated())
def test_mutations_of_valid_specs(text):
    check(text)


def test_corpus_is_valid():
    for text in CORPUS:
        spec = parse(text)
        assert len(bind_spec(spec, REGISTRY)) == len(spec.rules) > 0


IDENT = st.from_regex(r"[a-z_][a-z0-9_]{0,6}", fullmatch=True).filter(
    lambda s: s not in {"true", "false", "on", "skip", "train", "freeze", "base", "defaults"})
VALUE = st.recursive(
    st.one_of(st.integers(-10**6, 10**6).map(str), st.booleans().map(lambda b: "true" if b else "false"),
              st.floats(allow_nan=False, allow_infinity=False, width=32).map(repr), IDENT,
              st.text("abc xyz-/", max_size=8).map(lambda s: f'"{s}"')),
    lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    max_leaves=6,
)


@FUZZ
@given(st.lists(st.tuples(IDENT, VALUE), max_size=4, unique_by=lambda kv: kv[0]),
       st.sampled_from(["attn.*", "**.q_proj", "layers.[0..3].mlp.*", "{q,v}_proj", "h.*.x"]),
       st.sampled_from(["", " on nf4", " on int4(group=8)"]))
def test_generated_valid_rules_parse(args, pattern, quant):
    text = f"{pattern} -> v({', '.join(f'{k}={v}' for k, v in args)}){quant}"
    rule = parse(text).rules[0]
    assert [a.name for a in rule.action.call.args] == [k for k, _ in args]
    assert rule.pattern.text == pattern
    assert (rule.quant is None) == (quant == "")
