"""Pattern semantics: suffix matching, *, **, {a,b}, layer ranges, role aliases, nearest names."""

from __future__ import annotations

import pytest

from adapterhub.dsl import PatternMatcher, SurgeryError, compile_pattern, nearest, parse
from adapterhub.dsl.patterns import parse_pattern

ALIASES = {
    "attn": ["attn", "self_attn", "attention"],
    "mlp": ["mlp", "intermediate", "layer.*.output"],
    "layers": ["layers", "h", "layer"],
}

LLAMA = [f"model.layers.{i}.{block}.{leaf}" for i in range(32)
         for block, leaves in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                               ("mlp", ("gate_proj", "up_proj", "down_proj")))
         for leaf in leaves] + ["model.embed_tokens", "lm_head"]

BERT = [
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.0.attention.self.value",
    "bert.encoder.layer.0.attention.output.dense",
    "bert.encoder.layer.0.intermediate.dense",
    "bert.encoder.layer.0.output.dense",
    "bert.pooler.dense",
]


def m(text: str, aliases=None) -> PatternMatcher:
    return compile_pattern(parse_pattern(text), aliases or {})


def matching(text: str, names, aliases=None) -> list[str]:
    return m(text, aliases).filter(names)


def test_suffix_semantics():
    assert m("attn.*").matches("model.layers.3.attn.q")
    assert not m("attn.*").matches("model.layers.3.attn.q.lora_A")
    assert m("q_proj").matches("model.layers.0.self_attn.q_proj")
    assert not m("q_proj").matches("model.layers.0.self_attn.q_proj_x")
    assert not m("proj").matches("model.layers.0.self_attn.q_proj")  # whole segments only
    assert m("self_attn.q_proj").matches("model.layers.0.self_attn.q_proj")
    assert not m("attn.q_proj").matches("model.layers.0.self_attn.q_proj")


def test_full_name_matches_itself():
    assert m("model.layers.0.self_attn.q_proj").matches("model.layers.0.self_attn.q_proj")
    assert m("lm_head").matches("lm_head")


def test_star_is_exactly_one_segment():
    assert m("layers.*.mlp").matches("model.layers.7.mlp")
    assert not m("layers.*.mlp").matches("model.layers.mlp")
    assert not m("layers.*.mlp").matches("model.layers.7.x.mlp")
    assert not m("*").matches("")
    assert m("*").matches("anything.at.all")


def test_globstar_is_zero_or_more_segments():
    assert m("a.**.x").matches("a.x")
    assert m("a.**.x").matches("root.a.b.c.x")
    assert not m("a.**.x").matches("b.x")
    assert m("**.x").matches("x") and m("**.x").matches("a.b.x")
    assert matching("**.x", ["x", "a.x", "x.y"]) == matching("x", ["x", "a.x", "x.y"]) == ["x", "a.x"]
    assert m("x.**").matches("x") and m("x.**").matches("p.x.y.z")
    assert m("**").matches("") and m("**").matches("a.b")


def test_star_and_globstar_runs():
    assert not m("*.**.x").matches("x")
    assert m("*.**.x").matches("a.x") and m("*.**.x").matches("a.b.c.x")
    assert m("a.*.**.*.b").matches("a.1.2.b")
    assert not m("a.*.**.*.b").matches("a.1.b")


def test_alternatives():
    names = ["m.self_attn.q_proj", "m.self_attn.k_proj", "m.self_attn.v_proj"]
    assert matching("{q,v}_proj", names) == ["m.self_attn.q_proj", "m.self_attn.v_proj"]
    assert matching("{q_proj,v_proj}", names) == ["m.self_attn.q_proj", "m.self_attn.v_proj"]
    assert matching("self_attn.{k}_proj", names) == ["m.self_attn.k_proj"]
    two_groups = ["a.up_x", "a.down_proj", "a.gate_proj"]
    assert matching("{up,down}_{proj,x}", two_groups) == ["a.up_x", "a.down_proj"]


def test_wildcard_inside_a_segment():
    assert matching("*_proj", ["a.q_proj", "a.proj", "a.q_proj.x"]) == ["a.q_proj"]
    assert matching("mlp.*_proj", ["mlp._proj", "mlp.up_proj"]) == ["mlp._proj", "mlp.up_proj"]


def test_range_adapts_only_listed_layers():
    hits = matching("layers.[0..11].self_attn.*", LLAMA)
    layers = sorted({int(n.split(".")[2]) for n in hits})
    assert layers == list(range(12))
    assert len(hits) == 12 * 4
    assert not m("layers.[0..11].self_attn.*").matches("model.layers.12.self_attn.q_proj")


def test_range_lists_and_singletons():
    pat = m("layers.[0..3,7,10..11].mlp.*")
    layers = sorted({int(n.split(".")[2]) for n in pat.filter(LLAMA)})
    assert layers == [0, 1, 2, 3, 7, 10, 11]


def test_range_matches_exact_decimal_integers_only():
    pat = m("h.[2..15]")
    assert pat.matches("h.2") and pat.matches("h.15") and pat.matches("t.h.9")
    for name in ("h.1", "h.16", "h.02", "h.x", "h.2a", "h.-3", "h.150"):
        assert not pat.matches(name), name
    big = m("h.[95..1234]")
    assert [i for i in range(2000) if big.matches(f"h.{i}")] == list(range(95, 1235))
    assert m("h.[0]").matches("h.0") and not m("h.[0]").matches("h.00")


def test_integer_segments_as_literals():
    assert m("layers.3.mlp").matches("model.layers.3.mlp")
    assert not m("layers.3.mlp").matches("model.layers.13.mlp")
    assert m("0").matches("seq.0") and not m("0").matches("seq.10")


def test_role_aliases_llama():
    hits = matching("attn.*", LLAMA, ALIASES)
    assert len(hits) == 32 * 4 and all(".self_attn." in n for n in hits)
    assert matching("layers.[0..1].attn.q_proj", LLAMA, ALIASES) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_role_aliases_bert_mlp_multi_segment():
    assert matching("mlp.*", BERT, ALIASES) == [
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.0.output.dense",
    ]
    assert not m("mlp.*", ALIASES).matches("bert.encoder.layer.0.attention.output.dense")


def test_role_aliases_bert_attention_containers():
    # the containers match; expanding a container to its leaves is the engine's job
    assert m("attn.*", ALIASES).matches("bert.encoder.layer.0.attention.self")
    assert m("attn.*", ALIASES).matches("bert.encoder.layer.0.attention.output")
    assert m("attn.**", ALIASES).matches("bert.encoder.layer.0.attention.self.query")


def test_role_alone_matches_role_word_even_without_listing_it():
    assert m("mlp", {"mlp": ["ffn"]}).matches("a.mlp")
    assert m("mlp", {"mlp": ["ffn"]}).matches("a.ffn")


def test_aliases_not_applied_inside_alternatives_or_to_partial_words():
    assert not m("{attn,x}.q", ALIASES).matches("m.self_attn.q")
    assert m("{attn,x}.q", ALIASES).matches("m.attn.q")
    assert not m("attn_*", ALIASES).matches("m.self_attn_x")
    assert not m("attn", {}).matches("m.self_attn")


def test_alias_fragment_with_globstar():
    aliases = {"blk": ["a.**.b"]}
    assert m("blk.x", aliases).matches("r.a.b.x")
    assert m("blk.x", aliases).matches("r.a.m.n.b.x")
    assert m("blk", {"blk": ["**.z"]}).matches("r.q.z")


def test_bad_alias_fragment_is_a_plugin_error():
    from adapterhub.registry.errors import PluginError

    with pytest.raises(PluginError, match="not a valid pattern"):
        m("role.x", {"role": ["a..b"]})


def test_compile_accepts_text_and_rule_patterns():
    rule = parse("layers.[0..1].mlp.* -> lora").rules[0]
    assert compile_pattern(rule.pattern, ALIASES).matches("model.layers.1.mlp.up_proj")
    assert compile_pattern("lm_head").matches("lm_head")
    assert compile_pattern(rule.pattern).pattern is rule.pattern


def test_matcher_regex_is_one_anchored_regex():
    pat = m("attn.*", ALIASES)
    assert pat.regex.startswith(r"(?:^|\.)") and pat.regex.endswith("$")
    assert pat.roles == ("attn",)


@pytest.mark.parametrize("text,column,message", [
    ("a..b", 3, "empty segment in pattern"),
    (".a", 1, "empty segment in pattern"),
    ("a.", 3, "empty segment in pattern"),
    ("***", 1, "'***' is not a pattern segment"),
    ("a.{q,v", 3, "unclosed '{'"),
    ("a.q,v}", 6, "unbalanced '}': no '{' before it"),
    ("a.q,v", 4, "',' outside '{...}'"),
    ("a.qv}", 5, "unbalanced '}': no '{' before it"),
    ("{q,}_p", 4, "empty alternative in '{...}'"),
    ("{,q}_p", 2, "empty alternative in '{...}'"),
    ("{}", 2, "empty alternative in '{...}'"),
    ("{a{b}}", 3, "'{' inside '{...}' is not allowed"),
    ("[5..2]", 2, "empty layer range 5..2: the start is greater than the end"),
    ("x.[0..3", 3, "unclosed '['"),
    ("x.[]", 3, "empty layer range '[]'"),
    ("x.[1,,2]", 6, "empty item in layer range"),
    ("x.[1..]", 7, "expected a layer index (a non-negative integer)"),
    ("x.[a]", 4, "expected a layer index (a non-negative integer), got 'a'"),
    ("x.[0..3]y", 9, "a range must be a whole segment"),
    ("x[0..3]", 2, "a range must be a whole segment"),
    ("q**", 2, "'**' must be a whole segment"),
])
def test_pattern_errors_have_exact_columns(text, column, message):
    with pytest.raises(SurgeryError) as info:
        parse_pattern(text, line=4, column=1)
    assert info.value.message == message
    assert (info.value.line, info.value.column) == (4, column)


def test_pattern_error_columns_are_relative_to_the_line():
    with pytest.raises(SurgeryError) as info:
        parse("x -> skip\n  a.b..c -> lora\n")
    assert (info.value.line, info.value.column) == (2, 7)


def test_nearest_prefers_distinct_suffixes():
    got = nearest("self_atn.q_proj", LLAMA)
    assert got[0] == "model.layers.0.self_attn.q_proj"
    assert len(got) == 5 and len(set(got)) == 5
    assert {n.rsplit(".", 1)[1] for n in got[:4]} == {"q_proj", "k_proj", "v_proj", "o_proj"}


def test_nearest_full_names_and_limits():
    assert nearest("lm_haed", LLAMA, n=1) == ["lm_head"]
    assert nearest("embed_token", LLAMA, n=2)[0] == "model.embed_tokens"
    assert nearest("zzzzzzzz", LLAMA) == []
    assert nearest("x", []) == []
    assert nearest("**.lm_haed", LLAMA, n=1) == ["lm_head"]
