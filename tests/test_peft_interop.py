"""PEFT interop with the real PEFT: adapterhub bundles load in PEFT, PEFT adapters load in adapterhub."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import adapterhub
from adapterhub import AdapterhubError
from adapterhub.models import build_builtin
from adapterhub.surgery import applied

peft = pytest.importorskip("peft")

TOL = 1e-5


def trained(name: str, spec: str) -> torch.nn.Module:
    """``spec`` applied to a built-in model, every trainable tensor moved off its init."""
    model = adapterhub.apply(build_builtin(name), spec, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_load(name: str, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(build_builtin(name), str(path)).eval()


def keys(path) -> set[str]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return set(f.keys())


# --------------------------------------------------------------------------- adapterhub -> PEFT

TO_PEFT = [
    ("tiny-llama", "attn.* -> lora(r=4, alpha=8)\nmlp.* -> lora(r=2, alpha=6)\nlm_head -> train\n", "LORA"),
    ("tiny-llama", "attn.{q_proj,v_proj} -> lora(r=4, alpha=16, rslora=true)\n"
                   "layers.[0..1].mlp.up_proj -> lora(r=8, alpha=2, rslora=true)\n", "LORA"),
    ("tiny-llama", "attn.* -> dora(r=4, alpha=8)\nmlp.down_proj -> dora(r=2, alpha=8)\n", "LORA"),
    ("tiny-llama", "attn.* -> dora(r=4, alpha=8, rslora=true)\n", "LORA"),
    ("tiny-llama", "embed -> lora(r=4)\nattn.q_proj -> lora_fa(r=4)\n", "LORA"),
    # 21 full module names (leaf names would reach layer 3): PEFT compresses lists of 20+ itself
    ("tiny-llama", "layers.[0..2].attn.* -> lora(r=2)\nlayers.[0..2].mlp.* -> lora(r=3)\n", "LORA"),
    ("tiny-gpt2", "attn.* -> lora(r=4, alpha=8)\nmlp.c_fc -> lora(r=2)\n", "LORA"),
    ("tiny-gpt2", "attn.* -> lora(r=4, alpha=8, rslora=true)\n", "LORA"),
    ("tiny-gpt2", "attn.c_attn -> dora(r=4, alpha=8)\nmlp.* -> dora(r=2, alpha=4)\n", "LORA"),
    ("tiny-llama", "attn.* -> vera(r=8, seed=5)\nmlp.up_proj -> vera(r=8, seed=5)\n", "VERA"),
    ("tiny-llama", "attn.* -> vera(r=8, save_projection=false)\n", "VERA"),
    ("tiny-gpt2", "attn.* -> vera(r=16, seed=2)\n", "VERA"),
    ("tiny-llama", "attn.{k_proj,v_proj} -> ia3\nmlp.down_proj -> ia3(feedforward=true)\n", "IA3"),
    ("tiny-gpt2", "attn.c_attn -> ia3\nmlp.c_proj -> ia3(feedforward=true)\n", "IA3"),
]


@pytest.mark.parametrize("name,spec,peft_type", TO_PEFT)
def test_adapterhub_bundle_loads_in_peft_with_equal_logits(tmp_path, ids, name, spec, peft_type):
    model = trained(name, spec)
    adapterhub.save(model, tmp_path / "b")
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type
    pm = peft_load(name, tmp_path / "b")
    assert (logits(pm, ids) - logits(model, ids)).abs().max().item() <= TOL
    # the PEFT-format bundle is still an adapterhub bundle
    again = adapterhub.load(build_builtin(name), tmp_path / "b")
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_lora_config_has_peft_keys_and_patterns(tmp_path):
    spec = "attn.* -> lora(r=4, alpha=8)\nmlp.* -> lora(r=2, alpha=6)\nlayers.3.mlp.up_proj -> lora(r=8, alpha=6)\n" \
           "lm_head -> train\n"
    adapterhub.save(trained("tiny-llama", spec), tmp_path / "b")
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    reference = peft.LoraConfig(target_modules=["q_proj"]).to_dict()
    assert set(config) == set(reference) - {"peft_version"}
    assert config["r"] == 4 and config["lora_alpha"] == 8  # the most common rank / alpha
    # a leaf name where all its modules agree, else escaped full names (keys never overlap, so order is free)
    assert config["rank_pattern"] == {"gate_proj": 2, "down_proj": 2, "model\\.layers\\.3\\.mlp\\.up_proj": 8,
                                      **{f"model\\.layers\\.{i}\\.mlp\\.up_proj": 2 for i in range(3)}}
    assert config["alpha_pattern"] == {"gate_proj": 6, "up_proj": 6, "down_proj": 6}
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                "v_proj"]
    assert config["modules_to_save"] == ["lm_head"] and config["inference_mode"] is True
    assert config["auto_mapping"]["base_model_class"] == "LlamaForCausalLM"
    assert config["base_model_name_or_path"] == "tiny-llama"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns about unknown keys; there must be none
        loaded = peft.LoraConfig.from_pretrained(str(tmp_path / "b"))
    assert loaded.rank_pattern == config["rank_pattern"]
    card = (tmp_path / "b" / "README.md").read_text()
    assert card.startswith("---\nbase_model: tiny-llama\nlibrary_name: peft\ntags:\n- adapterhub\n- lora\n- peft\n")
    assert "lm_head -> train" in card


def test_gpt2_config_uses_fan_in_fan_out_and_full_names_where_leaf_names_are_ambiguous(tmp_path):
    adapterhub.save(trained("tiny-gpt2", "attn.c_proj -> lora(r=2)\n"), tmp_path / "b")
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    # mlp.c_proj is also named c_proj, so the leaf name would select too much
    assert config["target_modules"] == [f"transformer.h.{i}.attn.c_proj" for i in range(4)]


def test_vera_projection_is_stored_under_peft_key(tmp_path):
    adapterhub.save(trained("tiny-llama", "attn.* -> vera(r=8)\nmlp.* -> vera(r=8)\n"), tmp_path / "b")
    k = keys(tmp_path / "b")
    assert {"base_model.vera_A", "base_model.vera_B"} <= k
    assert not any(x.endswith((".vera_A", ".vera_B")) for x in k - {"base_model.vera_A", "base_model.vera_B"})
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        assert tuple(f.get_tensor("base_model.vera_A").shape) == (8, 128)  # r x largest in (down_proj)
        assert tuple(f.get_tensor("base_model.vera_B").shape) == (128, 8)  # largest out x r
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["projection_prng_key"] == 0 and config["save_projection"] is True and config["r"] == 8
    assert set(config) == set(peft.VeraConfig(target_modules=["q_proj"]).to_dict()) - {"peft_version"}


def test_quantized_base_is_still_expressible_with_a_note(tmp_path):
    adapterhub.save(trained("tiny-llama", "attn.* -> lora(r=4) on nf4\n"), tmp_path / "b")
    assert (tmp_path / "b" / "adapter_config.json").is_file()
    card = (tmp_path / "b" / "README.md").read_text()
    assert "library_name: peft" in card and "quantized with nf4" in card


@pytest.mark.parametrize("spec,reason", [
    ("attn.* -> lora(r=4)\nmlp.* -> ia3\n", "it mixes ia3, lora"),
    ("attn.* -> glora(r=2)\n", "PEFT has no equivalent of glora"),
    ("attn.q_proj -> lora(r=4, rslora=true)\nattn.v_proj -> lora(r=4)\n", "use_rslora"),
    ("attn.q_proj -> vera(r=4, seed=1)\nattn.v_proj -> vera(r=4, seed=2)\n", "one projection"),
    ("attn.* -> lora(r=4)\nmlp.* -> dora(r=4)\n", "it mixes dora, lora"),
])
def test_inexpressible_adapters_have_no_peft_config_and_say_why(tmp_path, ids, spec, reason):
    model = trained("tiny-llama", spec)
    adapterhub.save(model, tmp_path / "b")
    assert not (tmp_path / "b" / "adapter_config.json").exists()
    card = (tmp_path / "b" / "README.md").read_text()
    assert "library_name: adapterhub" in card and reason in card
    assert torch.equal(logits(adapterhub.load(build_builtin("tiny-llama"), tmp_path / "b"), ids), logits(model, ids))


# --------------------------------------------------------------------------- PEFT -> adapterhub


def peft_saved(name: str, config, path):
    """A PEFT model with random non-zero adapter weights, saved with save_pretrained."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(build_builtin(name), config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    pm.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(str(path))
    return pm


FROM_PEFT = [
    ("tiny-llama", lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"],
                                           rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 5},
                                           modules_to_save=["lm_head"])),
    ("tiny-llama", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.self_attn\.(q|k)_proj",
                                           use_rslora=True, use_dora=True)),
    ("tiny-llama", lambda: peft.LoraConfig(r=3, target_modules="all-linear", exclude_modules=["o_proj"])),
    ("tiny-llama", lambda: peft.LoraConfig(r=3, target_modules=["q_proj", "down_proj"], layers_to_transform=[0, 3],
                                           layers_pattern="layers", use_rslora=True)),
    ("tiny-llama", lambda: peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])),
    ("tiny-gpt2", lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                                          rank_pattern={"c_fc": 2})),
    ("tiny-gpt2", lambda: peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                                          use_dora=True, use_rslora=True)),
    ("tiny-gpt2", lambda: peft.LoraConfig(r=2, target_modules="all-linear")),
    ("tiny-llama", lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                           projection_prng_key=3)),
    ("tiny-llama", lambda: peft.VeraConfig(r=8, target_modules=["q_proj", "v_proj"], save_projection=False)),
    ("tiny-llama", lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                          feedforward_modules=["down_proj"])),
    ("tiny-gpt2", lambda: peft.IA3Config(target_modules=["c_attn", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"])),
]


@pytest.mark.parametrize("name,make_config", FROM_PEFT)
def test_peft_adapter_loads_in_adapterhub_with_equal_logits(tmp_path, ids, name, make_config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VeraConfig(save_projection=False) warns
        config = make_config()
    pm = peft_saved(name, config, tmp_path / "p")
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        model = adapterhub.load(build_builtin(name), tmp_path / "p")
    assert (logits(model, ids) - logits(pm, ids)).abs().max().item() <= TOL
    # saved again by adapterhub it is a full bundle, and PEFT still loads it
    adapterhub.save(model, tmp_path / "b")
    assert (tmp_path / "b" / "adapterhub.json").is_file() and (tmp_path / "b" / "adapter_config.json").is_file()
    assert (logits(peft_load(name, tmp_path / "b"), ids) - logits(pm, ids)).abs().max().item() <= TOL


def test_translated_spec_selects_exactly_peft_targets(tmp_path):
    peft_saved("tiny-llama", peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             rank_pattern={"v_proj": 2}, layers_to_transform=[1, 2]), tmp_path / "p")
    with pytest.warns(UserWarning):
        model = adapterhub.load(build_builtin("tiny-llama"), tmp_path / "p")
    entries = {e.module: e.params for e in applied(model).plan.entries if e.action == "variant"}
    assert sorted(entries) == sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in (1, 2) for p in "qv")
    assert entries["model.layers.1.self_attn.v_proj"]["r"] == 2 and entries["model.layers.2.self_attn.q_proj"]["r"] == 4
    assert entries["model.layers.1.self_attn.q_proj"]["alpha"] == 16
    spec = applied(model).plan.spec
    assert spec.base == "tiny-llama" and "lora(r=2, alpha=16)" in spec.source


@pytest.mark.parametrize("change,message", [
    ({"bias": "all"}, "bias='all'"),
    ({"lora_bias": True}, "lora_bias"),
    ({"peft_type": "PREFIX_TUNING"}, "PREFIX_TUNING has no adapterhub equivalent"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"target_modules": ["nothing_here"]}, "match no module"),
    ({"target_modules": r".*\.self_attn"}, "targets 'model.layers.0.self_attn' \\(LlamaAttention\\)"),
])
def test_unsupported_peft_configs_are_refused_by_name(tmp_path, change, message):
    peft_saved("tiny-llama", peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(AdapterhubError, match=message):
        adapterhub.load(build_builtin("tiny-llama"), tmp_path / "p")


def test_pickled_peft_adapters_are_never_loaded(tmp_path):
    peft_saved("tiny-llama", peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "p")
    (tmp_path / "p" / "adapter_model.safetensors").rename(tmp_path / "p" / "adapter_model.bin")
    with pytest.raises(AdapterhubError, match="safetensors only"):
        adapterhub.load(build_builtin("tiny-llama"), tmp_path / "p")


def test_peft_adapter_with_wrong_shapes_is_a_clear_error(tmp_path):
    peft_saved("tiny-llama", peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "r": 3}))
    with pytest.raises(AdapterhubError, match="has shape"), pytest.warns(UserWarning):
        adapterhub.load(build_builtin("tiny-llama"), tmp_path / "p")


def test_peft_embedding_base_weights_are_loaded_like_peft_does(tmp_path, ids):
    pm = peft_saved("tiny-llama", peft.LoraConfig(r=4, target_modules=["embed_tokens"]), tmp_path / "p")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in keys(tmp_path / "p")
    # a checkpoint whose saved base embedding differs (e.g. resized and retrained): PEFT loads it into the base
    state = {}
    with safe_open(str(tmp_path / "p" / "adapter_model.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state["base_model.model.model.embed_tokens.base_layer.weight"] += 0.5
    save_file(state, str(tmp_path / "p" / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning):
        model = adapterhub.load(build_builtin("tiny-llama"), tmp_path / "p")
    assert (logits(model, ids) - logits(peft_load("tiny-llama", tmp_path / "p"), ids)).abs().max().item() <= TOL
    assert not torch.equal(logits(model, ids), logits(pm, ids))


def test_base_changing_initialisations_are_flagged(tmp_path):
    peft_saved("tiny-llama", peft.LoraConfig(r=2, target_modules=["q_proj"]), tmp_path / "p")
    path = tmp_path / "p" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "pissa_niter_4"}))
    with pytest.warns(UserWarning) as record:
        adapterhub.load(build_builtin("tiny-llama"), tmp_path / "p")
    assert any("changes the base weights" in str(w.message) for w in record)
