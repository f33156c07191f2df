"""``adapterhub export --to peft``: mergeable adapters become plain LoRA that the real PEFT loads."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import adapterhub
from adapterhub import AdapterhubError
from adapterhub.export import export_peft, lowrank
from adapterhub.models import build_builtin
from adapterhub.registry import NotMergeableError

peft = pytest.importorskip("peft")

from .test_peft_interop import logits, peft_load, trained  # noqa: E402


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


FULL_RANK = [
    ("tiny-llama", "attn.* -> glora(r=4)\n", 128),  # full rank of every attention matrix: exact
    ("tiny-gpt2", "attn.* -> glora(r=4)\n", 192),
    ("tiny-llama", "attn.* -> tied_lora(r=4)\nmlp.* -> tied_lora(r=2)\n", None),  # own rank is exact
    ("tiny-gpt2", "attn.* -> tied_lora(r=4)\n", None),
    ("tiny-llama", "attn.* -> vera(r=8)\nmlp.* -> vera(r=8)\n", None),
    ("tiny-gpt2", "attn.* -> vera(r=8)\n", None),
    ("tiny-gpt2", "attn.c_attn -> ia3\nmlp.c_proj -> ia3(feedforward=true)\n", 256),
    ("tiny-llama", "attn.* -> multilora(n=2, r=2)\nlm_head -> train\n", None),
    ("tiny-llama", "attn.* -> dora(r=4)\nembed -> lora(r=3)\n", 260),
]


@pytest.mark.parametrize("name,spec,rank", FULL_RANK)
def test_full_rank_export_loads_in_peft_with_equal_logits(tmp_path, ids, name, spec, rank):
    model = trained(name, spec)
    adapterhub.save(model, tmp_path / "b")
    report = export_peft(tmp_path / "b", tmp_path / "e", rank=rank)
    assert report.max_error <= 1e-6
    pm = peft_load(name, tmp_path / "e")
    assert (logits(pm, ids) - logits(model, ids)).abs().max().item() <= 1e-4
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not config["use_dora"] and not config["use_rslora"]
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    assert config["fan_in_fan_out"] == (name == "tiny-gpt2")
    assert not (tmp_path / "e" / "adapterhub.json").exists()
    assert "library_name: peft" in (tmp_path / "e" / "README.md").read_text()


def test_truncation_is_the_best_rank_r_approximation_and_its_error_is_reported(tmp_path, ids):
    model = trained("tiny-llama", "attn.* -> glora(r=4)\n")
    adapterhub.save(model, tmp_path / "b")
    report = export_peft(tmp_path / "b", tmp_path / "e")  # default: the layer's own r = 4
    written = tensors(tmp_path / "e")
    layers = dict(adapterhub.adapter_layers(model))
    for m in report.modules:
        assert m.rank == 4
        delta = layers[m.module].delta_weight().double()
        s = torch.linalg.svdvals(delta)
        assert m.rel_error == pytest.approx((s[4:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4)
        b = written[f"base_model.model.{m.module}.lora_B.weight"].double()
        a = written[f"base_model.model.{m.module}.lora_A.weight"].double()
        u, _, vh = torch.linalg.svd(delta)
        best = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
        assert torch.allclose(b @ a, best, atol=1e-5)
        # GLoRA changes the bias (E, W0 C) even on bias-less Llama layers: exact through lora_bias
        assert torch.allclose(written[f"base_model.model.{m.module}.lora_B.bias"],
                              layers[m.module].delta_bias().float(), atol=1e-6)
    assert 0 < report.max_error < 1
    assert any("truncated" in n for n in report.notes)
    # PEFT's model is the adapterhub model with each ΔW replaced by its rank-4 approximation
    pm = peft_load("tiny-llama", tmp_path / "e")
    diff = (logits(pm, ids) - logits(model, ids)).abs().max().item()
    assert 0 < diff < 0.1


def biased_gpt2() -> torch.nn.Module:
    """tiny-gpt2 with non-zero biases (transformers initialises them to 0)."""
    model = build_builtin("tiny-gpt2")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("attn.c_attn.bias"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model


def test_bias_changes_are_exported_through_lora_bias(tmp_path, ids):
    model = adapterhub.apply(biased_gpt2(), "attn.c_attn -> ia3\n")  # l * (W x + b): the bias changes
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    adapterhub.save(model, tmp_path / "b")
    report = export_peft(tmp_path / "b", tmp_path / "e", model=biased_gpt2(), rank=64)
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and report.lora_bias
    assert all(m.bias_norm is not None and m.bias_norm > 0 for m in report.modules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(biased_gpt2(), str(tmp_path / "e")).eval()
    assert (logits(pm, ids) - logits(model, ids)).abs().max().item() <= 1e-4
    # without lora_bias PEFT would miss the bias change: the export is exact only through it
    layer = dict(adapterhub.adapter_layers(model))["transformer.h.0.attn.c_attn"]
    written = tensors(tmp_path / "e")["base_model.model.transformer.h.0.attn.c_attn.lora_B.bias"]
    assert torch.allclose(written, layer.delta_bias().float(), atol=1e-6)


def test_export_of_a_lora_reloads_in_adapterhub_through_its_peft_config(tmp_path, ids):
    model = trained("tiny-llama", "attn.* -> lora(r=4, alpha=16, rslora=true)\nmlp.* -> lora(r=2)\n")
    adapterhub.save(model, tmp_path / "b")
    report = export_peft(tmp_path / "b", tmp_path / "e")
    assert {m.rank for m in report.modules} == {4, 2} and report.max_error <= 1e-6
    config = json.loads((tmp_path / "e" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {"gate_proj": 2, "up_proj": 2, "down_proj": 2}
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        again = adapterhub.load(build_builtin("tiny-llama"), tmp_path / "e")
    assert (logits(again, ids) - logits(model, ids)).abs().max().item() <= 1e-5


def test_export_from_a_peft_directory_and_with_an_explicit_model(tmp_path, ids):
    model = trained("tiny-llama", "attn.* -> vera(r=8)\n")
    adapterhub.save(model, tmp_path / "b")
    (tmp_path / "b" / "adapterhub.json").unlink()  # a PEFT-only directory now
    with pytest.warns(UserWarning):
        export_peft(tmp_path / "b", tmp_path / "e", model=build_builtin("tiny-llama"))
    assert (logits(peft_load("tiny-llama", tmp_path / "e"), ids) - logits(model, ids)).abs().max().item() <= 1e-4


def test_not_mergeable_adapters_are_refused(tmp_path):
    adapterhub.save(trained("tiny-llama", "layers -> prefix(tokens=4)\n"), tmp_path / "b")
    with pytest.raises(NotMergeableError, match="prefix adapter has no weight-space form"):
        export_peft(tmp_path / "b", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_unknown_base_model_asks_for_model(tmp_path):
    adapterhub.save(trained("tiny-llama", "attn.q_proj -> lora(r=2)\n"), tmp_path / "b")
    path = tmp_path / "b" / "adapterhub.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "base_model": "org/not-here"}))
    with pytest.raises(AdapterhubError, match="pass --model"):
        export_peft(tmp_path / "b", tmp_path / "e")
    with pytest.raises(AdapterhubError, match="--rank must be a positive"):
        export_peft(tmp_path / "b", tmp_path / "e", model="tiny-llama", rank=0)


def test_lowrank_factors():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(12, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 20, generator=g, dtype=torch.float64)
    b, a, err = lowrank(d, 5)
    assert b.shape == (12, 5) and a.shape == (5, 20) and err < 1e-6
    b, a, err = lowrank(d, 99)  # capped at min(out, in)
    assert a.shape == (12, 20)
    assert lowrank(torch.zeros(4, 3), 2)[2] == 0.0
    # B and A carry the same singular-value share (balanced factors)
    b, a, _ = lowrank(d, 3)
    assert torch.allclose(b.norm(dim=0), a.norm(dim=1), rtol=1e-4)


def test_cli_export_table_and_json(tmp_path):
    from adapterhub.cli import build_cli

    adapterhub.save(trained("tiny-gpt2", "attn.* -> tied_lora(r=4)\n"), tmp_path / "b")
    runner = CliRunner()
    result = runner.invoke(build_cli(), ["export", str(tmp_path / "b"), "--to", "peft", "--out", str(tmp_path / "e"),
                                         "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert len(data["modules"]) == 8 and data["max_rel_error"] < 1e-6
    assert {m["rank"] for m in data["modules"]} == {4} and data["lora_bias"] is False
    result = runner.invoke(build_cli(), ["export", str(tmp_path / "b"), "--out", str(tmp_path / "e2"), "--rank", "2"])
    assert result.exit_code == 0, result.output
    assert "rel. error" in result.output and "transformer.h.0.attn.c_attn" in result.output
    assert "wrote" in result.output and "truncated" in result.output
    adapterhub.save(trained("tiny-llama", "layers -> prefix(tokens=4)\n"), tmp_path / "p")
    result = runner.invoke(build_cli(), ["export", str(tmp_path / "p"), "--out", str(tmp_path / "e3")])
    assert result.exit_code == 1 and "error: cannot export to PEFT LoRA" in result.output


def test_export_from_a_store_reference(tmp_path, ids, monkeypatch):
    from adapterhub.cli import build_cli
    from adapterhub.store import Store

    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    model = trained("tiny-llama", "attn.* -> tied_lora(r=4)\n")
    adapterhub.save(model, tmp_path / "b")
    Store().save(tmp_path / "b", "tied", tag="prod")
    result = CliRunner().invoke(build_cli(), ["export", "tied@prod", "--out", str(tmp_path / "e"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["source"] == "tied@prod"
    assert (logits(peft_load("tiny-llama", tmp_path / "e"), ids) - logits(model, ids)).abs().max().item() <= 1e-4
