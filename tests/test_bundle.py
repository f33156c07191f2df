"""Bundles: save -> load round trip, manifest contents, base-model check, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import adapterhub
from adapterhub import AdapterhubError
from adapterhub.models import build_builtin

SPEC = "attn.* -> lora(r=4, alpha=8)\nmlp.* -> lora(r=2) on nf4\nlm_head -> train\n"


def trained(name="tiny-llama"):
    model = adapterhub.apply(build_builtin(name), SPEC, seed=3)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_round_trip_gives_identical_outputs(tmp_path, ids, name):
    model = trained(name)
    adapterhub.save(model, tmp_path / "b")
    fresh = adapterhub.load(build_builtin(name), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bundle_files_use_peft_key_names_and_manifest(tmp_path):
    adapterhub.save(trained(), tmp_path / "b", metrics={"eval_loss": 1.5})
    files = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert files == ["README.md", "adapter_model.safetensors", "adapterhub.json"]
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.lm_head.weight" in keys
    assert not any("base_layer" in k for k in keys)
    m = json.loads((tmp_path / "b" / "adapterhub.json").read_text())
    assert m["format_version"] == 1 and m["spec"] == SPEC and m["metrics"] == {"eval_loss": 1.5}
    q = m["modules"]["model.layers.0.mlp.up_proj"]
    assert (q["variant"], q["params"]["r"], q["quant"]) == ("lora", 2, "nf4")
    assert m["base_fingerprint"].startswith("sha256:")


def test_bundle_for_another_base_is_refused_unless_forced(tmp_path):
    adapterhub.save(trained("tiny-llama"), tmp_path / "b")
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=260))
    with pytest.raises(AdapterhubError, match="another base model"):
        adapterhub.load(other, tmp_path / "b")


def test_saving_replaces_atomically_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "b"
    adapterhub.save(trained(), target)
    adapterhub.save(trained(), target, metrics={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert json.loads((target / "adapterhub.json").read_text())["metrics"] == {"v": 2}


def test_corrupt_or_foreign_bundles_give_clear_errors(tmp_path):
    with pytest.raises(AdapterhubError, match="adapterhub.json is missing"):
        adapterhub.load(build_builtin("tiny-llama"), tmp_path)
    (tmp_path / "adapterhub.json").write_text("{not json")
    with pytest.raises(AdapterhubError, match="not valid JSON"):
        adapterhub.load(build_builtin("tiny-llama"), tmp_path)


def test_save_without_adapters_is_an_error(tmp_path):
    with pytest.raises(AdapterhubError, match="no adapters"):
        adapterhub.save(build_builtin("tiny-llama"), tmp_path / "b")
