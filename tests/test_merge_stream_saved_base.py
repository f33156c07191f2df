"""``adapterhub merge`` of LoftQ / LQ-LoRA bundles: the streamed merge restores the quantized base the
bundle saved (``base_quant.safetensors``) instead of re-running the quantize/SVD init.

Expected merged weights are computed here from the bundle's files alone: ``deq(Q)`` decoded from the
saved buffers (NF4 with double quantization by hand, ``lq`` with the numpy decoder of the variant
matrix), ``ΔW = (alpha/r) B A`` from the adapter tensors.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import adapterhub
from adapterhub import AdapterhubError
from adapterhub.merge_stream import merge_checkpoint
from adapterhub.models import build_builtin
from adapterhub.plugins import _saved_base, loftq, lqlora

from .test_merge_stream import hf_logits, trained
from .variant_cases.case_lqlora import decode_lq

LOFTQ = "attn.{q_proj,v_proj} -> loftq(r=4, alpha=16, iters=2) on nf4\n"
LQLORA = "attn.{q_proj,v_proj} -> lqlora(r=4, alpha=16, iters=2) on lq(bits=3, B0=32)\n"
LQ_BUDGET = "attn.{q_proj,v_proj} -> lqlora(r=4, alpha=8, iters=2) on lq(budget=3, rank=4)\n"
GPT2_LOFTQ = "attn.c_attn -> loftq(r=4, alpha=16, iters=2) on int8\n"
MODULE = "model.layers.0.self_attn.q_proj"


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def merged_weight(out: Path, module: str) -> torch.Tensor:
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        return f.get_tensor(f"{module}.weight")


def old_style(bundle: Path, to: Path) -> Path:
    """The bundle as saved before quantized bases were stored: no file, no manifest entry."""
    shutil.copytree(bundle, to)
    (to / _saved_base.FILE).unlink()
    m = json.loads((to / "adapterhub.json").read_text())
    del m["base_quant"]
    (to / "adapterhub.json").write_text(json.dumps(m))
    return to


def forbid_init(monkeypatch) -> None:
    """From now on, fail if a LoftQ / LQ-LoRA init runs (the saved base makes it unnecessary)."""
    def fail(*args, **kwargs):
        raise AssertionError("the quantize/SVD init ran")

    monkeypatch.setattr(loftq, "loftq_decompose", fail)
    monkeypatch.setattr(lqlora, "lq_decompose", fail)


def decode_nf4(saved: dict[str, torch.Tensor], shape: tuple[int, int], blocksize: int = 64) -> torch.Tensor:
    """bitsandbytes NF4 with double quantization: two codes per byte (high nibble first), the
    per-block absmax stored as 8-bit codes of a blockwise (256) quantization plus an offset."""
    packed = saved["qweight"].flatten().long()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten()
    i = torch.arange(saved["absmax"].numel())
    absmax = saved["nested_quant_map"].double()[saved["absmax"].long()] * saved["nested_absmax"].double()[i // 256]
    absmax = absmax + saved["nested_offset"].double()
    w = saved["quant_map"].double()[codes] * absmax[torch.arange(codes.numel()) // blocksize]
    return w.reshape(shape)


def expected_weight(bundle: Path, module: str, live: torch.nn.Module) -> torch.Tensor:
    """``deq(saved Q) + (alpha/r) B A`` from the bundle's files (``live``: the trained layer, for the
    lq config's bit widths and to check the decoders)."""
    manifest = json.loads((bundle / "adapterhub.json").read_text())
    entry = manifest["modules"][module]
    with safe_open(str(bundle / _saved_base.FILE), "pt") as f:
        prefix = f"{_saved_base.KEY_PREFIX}{module}."
        saved = {k.removeprefix(prefix): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    out_f, in_f = live.base_layer.out_features, live.base_layer.in_features
    if entry["quant"] == "nf4":
        deq = decode_nf4(saved, (out_f, in_f))
    else:
        deq = decode_lq(SimpleNamespace(config=live.base_layer.config, in_features=in_f, out_features=out_f,
                                        **saved)).double()
    assert (deq - live.base_layer.dequantize().double()).abs().max().item() <= 1e-6  # the decoder is right
    with safe_open(str(bundle / "adapter_model.safetensors"), "pt") as f:
        a = f.get_tensor(f"base_model.model.{module}.lora_A.weight").double()
        b = f.get_tensor(f"base_model.model.{module}.lora_B.weight").double()
    params = entry["params"]
    return deq + params["alpha"] / params["r"] * b @ a


@pytest.mark.parametrize("name, spec", [("tiny-llama", LOFTQ), ("tiny-llama", LQLORA), ("tiny-llama", LQ_BUDGET),
                                        ("tiny-gpt2", GPT2_LOFTQ)], ids=["loftq", "lqlora", "lq-budget", "gpt2"])
def test_streamed_merge_is_the_adapted_model(tmp_path, ids, name, spec, monkeypatch):
    """The merged checkpoint computes the adapted model's function and holds the in-memory merge's
    weights; no init runs and the saved-bases file is never read whole."""
    model = trained(name, spec)
    adapterhub.save(model, tmp_path / "b")
    assert (tmp_path / "b" / _saved_base.FILE).is_file()
    forbid_init(monkeypatch)
    monkeypatch.setattr(_saved_base, "load_file", lambda *a, **k: pytest.fail("base_quant read whole"))
    report = merge_checkpoint(name, tmp_path / "b", tmp_path / "m")
    assert (hf_logits(tmp_path / "m", ids) - logits(model, ids)).abs().max().item() <= 1e-5
    assert report.modules and all(r.base == "dequantized" for r in report.modules)
    assert any("saved in the bundle" in n for n in report.notes)
    names = [r.module for r in report.modules]
    merged, plain = adapterhub.merge_and_unload(model), build_builtin(name)
    for module in names:
        assert type(merged.get_submodule(module)) is type(plain.get_submodule(module))  # GPT-2: Conv1D again
        want = merged.get_submodule(module).weight.detach()
        assert (merged_weight(tmp_path / "m", module) - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("spec", [LOFTQ, LQLORA], ids=["loftq", "lqlora"])
def test_merge_uses_the_saved_base(tmp_path, spec):
    """A checkpoint whose weight differs from the one trained on (the fingerprint, structural, cannot
    tell) still merges into the saved ``deq(Q)``; re-running the init on it gives another ``Q``."""
    model = trained("tiny-llama", spec)
    adapterhub.save(model, tmp_path / "b")
    want = expected_weight(tmp_path / "b", MODULE, model.get_submodule(MODULE))
    old = old_style(tmp_path / "b", tmp_path / "old")
    merge_checkpoint("tiny-llama", tmp_path / "b", tmp_path / "exact")
    exact = merged_weight(tmp_path / "exact", MODULE)
    assert (exact.double() - want).abs().max().item() <= 1e-6
    for rel in (1e-6, 1e-3):
        ckpt = tmp_path / f"ckpt-{rel}"
        build_builtin("tiny-llama").save_pretrained(ckpt)
        sd = load_file(ckpt / "model.safetensors")
        w = sd[f"{MODULE}.weight"]
        sd[f"{MODULE}.weight"] = w + rel * w.abs() * torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
        save_file(sd, ckpt / "model.safetensors", metadata={"format": "pt"})
        merge_checkpoint(str(ckpt), tmp_path / "b", tmp_path / f"saved-{rel}")
        got = merged_weight(tmp_path / f"saved-{rel}", MODULE)
        assert torch.equal(got, exact)  # the checkpoint's weight of an owning module is not used at all
        merge_checkpoint(str(ckpt), old, tmp_path / f"init-{rel}")
        rerun = merged_weight(tmp_path / f"init-{rel}", MODULE)
        assert not torch.equal(rerun, exact)
        if rel == 1e-3:  # quantization codes flip: the re-run Q is visibly another one
            assert (rerun.double() - want).abs().max().item() > 1e-3


def test_old_bundle_merges_through_the_init(tmp_path, ids, monkeypatch):
    """Without saved bases the init runs on the checkpoint's (here bit-identical) weights: the same merge."""
    model = trained("tiny-llama", LOFTQ + "mlp.up_proj -> lqlora(r=4, alpha=16, iters=2) on lq(bits=4)\n")
    adapterhub.save(model, tmp_path / "b")
    old = old_style(tmp_path / "b", tmp_path / "old")
    calls = []
    real_loftq, real_lq = loftq.loftq_decompose, lqlora.lq_decompose
    monkeypatch.setattr(loftq, "loftq_decompose", lambda *a, **k: calls.append("loftq") or real_loftq(*a, **k))
    monkeypatch.setattr(lqlora, "lq_decompose", lambda *a, **k: calls.append("lq") or real_lq(*a, **k))
    report = merge_checkpoint("tiny-llama", old, tmp_path / "m")
    assert sorted(set(calls)) == ["loftq", "lq"] and len(calls) == len(report.modules) == 3 * 4
    assert any("init was re-run" in n for n in report.notes)
    assert (hf_logits(tmp_path / "m", ids) - logits(model, ids)).abs().max().item() <= 1e-5
    calls.clear()
    merge_checkpoint("tiny-llama", tmp_path / "b", tmp_path / "new")
    assert not calls  # the saved bases: no init
    for r in report.modules:
        assert torch.equal(merged_weight(tmp_path / "m", r.module), merged_weight(tmp_path / "new", r.module))


def test_bad_saved_bases_are_refused(tmp_path):
    adapterhub.save(trained("tiny-llama", LOFTQ), tmp_path / "b")
    broken = shutil.copytree(tmp_path / "b", tmp_path / "missing")
    (broken / _saved_base.FILE).unlink()
    with pytest.raises(AdapterhubError, match="base_quant.safetensors is missing"):
        merge_checkpoint("tiny-llama", broken, tmp_path / "m1")
    short = shutil.copytree(tmp_path / "b", tmp_path / "short")
    tensors = load_file(short / _saved_base.FILE)
    save_file({k: v for k, v in tensors.items() if not k.endswith(f"{MODULE}.qweight")}, short / _saved_base.FILE)
    with pytest.raises(AdapterhubError, match=f"module '{MODULE}'.*do not match"):
        merge_checkpoint("tiny-llama", short, tmp_path / "m2")
    assert not list((tmp_path / "m2").iterdir())  # nothing half-written
