"""Model sources: built-ins are deterministic; local directories load; infos see through adapters."""

from __future__ import annotations

import torch

import adapterhub
from adapterhub.models import build_builtin, load_model, module_infos, resolve_source


def test_builtins_are_deterministic():
    a, b = build_builtin("tiny-llama"), build_builtin("tiny-llama")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_local_directory_loads_with_weights(llama_dir, tiny_llama):
    assert resolve_source(str(llama_dir)).kind == "dir"
    loaded = load_model(str(llama_dir))
    assert torch.equal(loaded.lm_head.weight, tiny_llama.lm_head.weight)


def test_module_infos_treat_adapter_layers_as_leaves(tiny_llama):
    adapterhub.apply(tiny_llama, "attn.* -> lora(r=4)")
    infos = {i.name: i for i in module_infos(tiny_llama)}
    q = infos["model.layers.0.self_attn.q_proj"]
    assert q.kind == "adapter" and q.is_leaf
    assert "model.layers.0.self_attn.q_proj.lora_A" not in infos


def test_fingerprint_ignores_adapters_and_quantization(tiny_llama):
    from adapterhub.fingerprint import model_fingerprint

    before = model_fingerprint(tiny_llama)
    adapterhub.apply(tiny_llama, "attn.* -> lora(r=4) on nf4")
    assert model_fingerprint(tiny_llama) == before


def test_hub_id_resolves_through_the_local_hf_cache(tmp_path, monkeypatch, tiny_llama):
    import huggingface_hub.constants as hfc

    snapshot = tmp_path / "models--acme--tiny" / "snapshots" / ("a" * 40)
    tiny_llama.save_pretrained(snapshot)
    (tmp_path / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "models--acme--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(tmp_path))
    src = resolve_source("acme/tiny")
    assert src.kind == "hub" and src.path == snapshot
    p = adapterhub.plan("acme/tiny", "attn.* -> lora(r=2)")
    assert p.model == "acme/tiny" and len(p.entries) == 16
    assert torch.equal(load_model("acme/tiny").lm_head.weight, tiny_llama.lm_head.weight)
