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
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "adapterhub.json"]
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


# --------------------------------------------------------------------------- sources and cards


def test_load_from_a_store_reference(tmp_path, ids, monkeypatch):
    from adapterhub.store import Store

    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    model = trained()
    adapterhub.save(model, tmp_path / "b", metrics={"eval_loss": 1.25})
    Store().save(tmp_path / "b", "medical", tag="prod")
    for ref in ("medical@v1", "medical@prod", "medical"):
        fresh = adapterhub.load(build_builtin("tiny-llama"), ref)
        with torch.no_grad():
            assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(AdapterhubError, match="neither a bundle directory nor a stored adapter"):
        adapterhub.load(build_builtin("tiny-llama"), "unknown")


def test_load_from_the_hub_goes_through_remote_fetch(tmp_path, ids, monkeypatch):
    import sys
    import types

    model = trained()
    adapterhub.save(model, tmp_path / "b")
    calls = []
    fake = types.ModuleType("adapterhub.remote")

    def fetch(repo_id, revision):
        calls.append((repo_id, revision))
        return tmp_path / "b"

    fake.fetch = fetch
    monkeypatch.setitem(sys.modules, "adapterhub.remote", fake)
    fresh = adapterhub.load(build_builtin("tiny-llama"), "hf://org/medical@v2")
    adapterhub.load(build_builtin("tiny-llama"), "hf://org/medical")
    assert calls == [("org/medical", "v2"), ("org/medical", None)]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    monkeypatch.setitem(sys.modules, "adapterhub.remote", None)  # not installed
    with pytest.raises(AdapterhubError, match="Hub support"):
        adapterhub.load(build_builtin("tiny-llama"), "hf://org/medical@v2")


@pytest.mark.parametrize("source,message", [
    ("hf://medical", "not a Hub reference"),
    ("hf://org/", "not a Hub reference"),
    ("./does/not/exist", "does not exist"),
])
def test_bad_sources_are_clear_errors(source, message):
    with pytest.raises(AdapterhubError, match=message):
        adapterhub.load(build_builtin("tiny-llama"), source)


def test_a_file_is_not_a_bundle(tmp_path):
    from adapterhub.sources import bundle_dir

    (tmp_path / "f").write_text("x")
    with pytest.raises(AdapterhubError, match="is a file"):
        bundle_dir(tmp_path / "f")
    with pytest.raises(AdapterhubError, match="is a file"):
        bundle_dir(str(tmp_path / "f"))
    assert bundle_dir(str(tmp_path)) == tmp_path


def test_card_front_matter_spec_and_metrics(tmp_path):
    adapterhub.save(trained(), tmp_path / "b", metrics={"eval_loss": 1.5}, parent="medical@v1")
    card = (tmp_path / "b" / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert front.splitlines() == ["base_model: tiny-llama", "library_name: peft", "tags:", "- adapterhub", "- lora",
                                  "- peft"]
    assert SPEC.strip() in body and "- eval_loss: 1.5" in body and "medical@v1" in body
    assert "PeftModel.from_pretrained" in body and "quantized with nf4" in body
    prefix = adapterhub.apply(build_builtin("tiny-llama"), "layers -> prefix(tokens=4)\n")
    adapterhub.save(prefix, tmp_path / "p")
    card = (tmp_path / "p" / "README.md").read_text()
    assert "library_name: adapterhub" in card and "PEFT has no equivalent of prefix" in card
    assert not (tmp_path / "p" / "adapter_config.json").exists()
