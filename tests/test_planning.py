"""Resolving specs against models: suffix globs, containers, aliases, cascade, errors, totals."""

from __future__ import annotations

import json

import pytest

import adapterhub
from adapterhub.dsl import SurgeryError
from adapterhub.planning import plan

LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "dtype": "bfloat16", "tie_word_embeddings": False}


def modules(p, action=None):
    return [e.module for e in p.entries if action is None or e.action == action]


def test_attn_star_on_llama_targets_q_k_v_o_of_every_layer(tiny_llama):
    p = plan(tiny_llama, "attn.* -> lora(r=8)")
    assert modules(p) == [f"model.layers.{i}.self_attn.{n}" for i in range(4) for n in LLAMA_ATTN]
    # q: 64->64, k/v: 64->32 (2 kv heads of 16), o: 64->64; r*(in+out) each
    per_layer = 8 * ((64 + 64) + (64 + 32) + (64 + 32) + (64 + 64))
    assert p.trainable == 4 * per_layer
    assert all(e.variant == "lora" and e.params["r"] == 8 and e.rule_line == 1 for e in p.entries)


def test_alternatives_and_globstar(tiny_llama):
    p = plan(tiny_llama, "**.self_attn.{q,v}_proj -> lora(r=16, alpha=32, dropout=0.05)")
    assert modules(p) == [f"model.layers.{i}.self_attn.{n}" for i in range(4) for n in ("q_proj", "v_proj")]
    assert p.entries[0].params == {"r": 16, "alpha": 32.0, "dropout": 0.05, "rslora": False, "init": "kaiming"}


def test_layer_range_leaves_other_layers_alone(tiny_llama):
    p = plan(tiny_llama, "layers.[0..1].mlp.* -> lora(r=4)\n")
    assert {e.module.split(".")[2] for e in p.entries} == {"0", "1"}
    assert len(p.entries) == 6


def test_container_stands_for_its_supported_leaves(tiny_llama):
    p = plan(tiny_llama, "layers.0.mlp -> lora(r=2)")
    assert modules(p) == [f"model.layers.0.mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")]
    # a container with unsupported leaves (norms) only yields the supported ones
    p = plan(tiny_llama, "layers.0 -> lora(r=2)")
    assert len(p.entries) == 7 and all("norm" not in m for m in modules(p))


def test_last_matching_rule_wins_and_plan_names_the_line(tiny_llama):
    p = plan(tiny_llama, "attn.* -> lora(r=8)\nattn.o_proj -> skip\n")
    won = {e.module: (e.action, e.rule_line) for e in p.entries}
    assert won["model.layers.2.self_attn.o_proj"] == ("skip", 2)
    assert won["model.layers.2.self_attn.q_proj"] == ("variant", 1)
    assert p.trainable == 4 * 8 * ((64 + 64) + (64 + 32) + (64 + 32))


def test_fully_shadowed_rule_is_a_warning(tiny_llama):
    p = plan(tiny_llama, "attn.q_proj -> lora(r=4)\nattn.* -> lora(r=8)\n")
    assert len(p.warnings) == 1
    assert "line 1" not in p.warnings[0] and ":1:" in p.warnings[0] and "shadowed" in p.warnings[0]
    assert "line 2" in p.warnings[0]


def test_rule_matching_nothing_is_an_error_with_nearest_names(tiny_llama):
    with pytest.raises(SurgeryError) as exc:
        plan(tiny_llama, "attn.* -> lora(r=8)\nattn.qproj -> lora(r=4)\n")
    err = exc.value
    assert (err.line, err.column) == (2, 1)
    assert "matches no module" in err.message
    assert "q_proj" in (err.hint or "")


def test_variant_on_unsupported_module_type_is_an_error(tiny_llama):
    with pytest.raises(SurgeryError) as exc:
        plan(tiny_llama, "model.norm -> lora(r=8)")
    assert "LlamaRMSNorm" in str(exc.value) and "lora cannot wrap" in str(exc.value)
    assert exc.value.column == 15


@pytest.mark.parametrize("model, expected", [
    ("tiny_llama", {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"}),
    ("tiny_gpt2", {"attn.c_attn", "attn.c_proj"}),
    ("tiny_bert", {"attention.self.query", "attention.self.key", "attention.self.value",
                   "attention.output.dense"}),
])
def test_attn_alias_works_across_families(model, expected, request):
    p = plan(request.getfixturevalue(model), "attn.* -> lora(r=4)")
    names = modules(p)
    assert len(names) == 4 * len(expected)
    assert {next(s for s in expected if n.endswith("." + s)) for n in names} == expected


def test_mlp_alias_on_bert_excludes_attention_output(tiny_bert):
    p = plan(tiny_bert, "mlp.* -> lora(r=4)")
    names = modules(p)
    assert len(names) == 8
    assert all(n.endswith(("intermediate.dense", ".output.dense")) for n in names)
    assert not any("attention" in n for n in names)


def test_gpt2_conv1d_counts_use_fan_in_and_fan_out(tiny_gpt2):
    p = plan(tiny_gpt2, "attn.c_attn -> lora(r=2)")
    assert p.trainable == 4 * 2 * (64 + 192)


def test_train_freeze_and_quantized_bytes(tiny_llama):
    p = plan(tiny_llama, "lm_head -> train\nmlp.* -> freeze on nf4\n")
    head = next(e for e in p.entries if e.module == "lm_head")
    assert head.trainable == 64 * 260 and p.trainable == 64 * 260
    mlp = [e for e in p.entries if e.action == "freeze"]
    assert len(mlp) == 12 and all(e.quant == "nf4" for e in mlp)
    e = mlp[0]
    n = 64 * 128
    assert e.bytes_before == n * 4
    assert e.bytes_after == pytest.approx(n * (4 + 8 / 64 + 32 / (64 * 256)) / 8, abs=1)
    assert p.bytes_after == p.total_bytes - sum(x.bytes_before - x.bytes_after for x in mlp)


def test_plan_json_and_summary(tiny_llama):
    p = plan(tiny_llama, "attn.* -> lora(r=8) on nf4")
    data = json.loads(json.dumps(p.to_json()))
    assert data["trainable_params"] == p.trainable
    assert data["weight_bytes_after"] < data["weight_bytes_before"]
    assert 0 < data["trainable_percent"] < 100
    assert data["entries"][0]["quant"] == "nf4" and data["entries"][0]["rule_line"] == 1


def test_checkpoint_directory_plans_like_the_live_model(tiny_llama, llama_dir):
    live = plan(tiny_llama, "attn.* -> lora(r=8)\nmlp.* -> lora(r=4) on nf4")
    ckpt = plan(llama_dir, "attn.* -> lora(r=8)\nmlp.* -> lora(r=4) on nf4")
    assert [(e.module, e.trainable, e.bytes_after) for e in ckpt.entries] == \
        [(e.module, e.trainable, e.bytes_after) for e in live.entries]


def test_checkpoint_plan_reads_no_weights(llama_dir):
    weights = llama_dir / "model.safetensors"
    header_len = int.from_bytes(weights.read_bytes()[:8], "little")
    weights.write_bytes(weights.read_bytes()[: 8 + header_len])  # tensor data gone, header intact
    p = plan(llama_dir, "attn.* -> lora(r=8)")
    assert len(p.entries) == 16


def test_safetensors_only_directory_uses_headers(tmp_path, tiny_llama):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_llama.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    p = plan(tmp_path, "attn.* -> lora(r=8)\nmlp -> lora(r=2)")
    assert len([e for e in p.entries if e.params["r"] == 8]) == 16
    assert len([e for e in p.entries if e.params["r"] == 2]) == 12


def test_70b_config_plans_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_70B))
    p = plan(tmp_path, "attn.* -> lora(r=8)")
    assert len(p.entries) == 4 * 80
    assert p.trainable == 80 * 8 * ((8192 + 8192) + 2 * (8192 + 1024) + (8192 + 8192))
    assert p.total_params > 70e9
    assert p.total_bytes == pytest.approx(2 * p.total_params)  # bfloat16 from the config


def test_plan_api_accepts_builtin_names_and_spec_files(tmp_path):
    spec = tmp_path / "s.surgery"
    spec.write_text("attn.* -> lora(r=4)\n")
    p = adapterhub.plan("tiny-gpt2", spec)
    assert p.spec.filename == str(spec) and len(p.entries) == 8


@pytest.mark.parametrize("spec", ["layers -> prefix(tokens=4)", "embed -> prompt(tokens=4)"])
def test_decoder_only_variants_are_refused_on_an_encoder_at_plan_time(spec):
    with pytest.raises(SurgeryError) as exc:
        plan("tiny-bert", spec)
    assert "decoder (causal) language models" in exc.value.message and exc.value.line == 1


def test_quantizer_that_cannot_quantize_the_matched_modules_is_located(tiny_llama):
    with pytest.raises(SurgeryError) as exc:
        plan(tiny_llama, "embed -> lora(r=4) on nf4")
    assert exc.value.column == 23 and "nf4 cannot quantize" in exc.value.message  # at "nf4"
