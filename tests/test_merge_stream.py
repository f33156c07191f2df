"""``adapterhub merge``: a full model written tensor by tensor that transformers loads."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import adapterhub
from adapterhub import AdapterhubError
from adapterhub.merge_stream import INDEX, Checkpoint, merge_checkpoint
from adapterhub.models import build_builtin


def trained(name: str, spec: str, seed: int = 1) -> torch.nn.Module:
    model = adapterhub.apply(build_builtin(name), spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def hf_logits(path, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def llama_shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    build_builtin("tiny-llama").save_pretrained(path, max_shard_size="100KB")
    return path


LLAMA_SPEC = ("attn.{q_proj,v_proj} -> lora(r=4, alpha=8)\nattn.o_proj -> dora(r=2)\nmlp.* -> ia3\n"
              "embed_tokens -> lora(r=2)\nlm_head -> train\n")


def test_sharded_llama_merge_loads_in_transformers(tmp_path, llama_shards, ids):
    model = trained("tiny-llama", LLAMA_SPEC)
    adapterhub.save(model, tmp_path / "b")
    report = merge_checkpoint(str(llama_shards), tmp_path / "b", tmp_path / "m")
    assert (hf_logits(tmp_path / "m", ids) - logits(model, ids)).abs().max().item() <= 1e-5
    src = json.loads((llama_shards / INDEX).read_text())
    out = json.loads((tmp_path / "m" / INDEX).read_text())
    assert out["weight_map"] == src["weight_map"] and len(set(out["weight_map"].values())) > 3
    assert (tmp_path / "m" / "config.json").is_file() and (tmp_path / "m" / "generation_config.json").is_file()
    assert len(report.modules) == 4 * 6 + 1 and report.replaced == ["lm_head.weight"]
    assert not [p for p in (tmp_path / "m").iterdir() if p.name.startswith(".")]  # staging removed
    with safe_open(str(tmp_path / "b" / "adapter_model.safetensors"), "pt") as f:
        head = f.get_tensor("base_model.model.lm_head.weight")
    from transformers import AutoModelForCausalLM

    assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / "m").lm_head.weight, head)


def test_tensors_are_read_one_at_a_time(tmp_path, llama_shards, monkeypatch):
    adapterhub.save(trained("tiny-llama", "attn.* -> lora(r=4)\nmlp.* -> glora(r=2, c=none, d=none, e=none)\n"),
                    tmp_path / "b")
    alive: set[int] = set()
    peak = [0]
    reads: list[str] = []
    read = Checkpoint.read

    def tracked(self, key):
        t = read(self, key)
        reads.append(key)
        alive.add(id(t))
        weakref.finalize(t, alive.discard, id(t))
        peak[0] = max(peak[0], len(alive))
        return t

    monkeypatch.setattr(Checkpoint, "read", tracked)
    report = merge_checkpoint(str(llama_shards), tmp_path / "b", tmp_path / "m")
    keys = json.loads((llama_shards / INDEX).read_text())["weight_map"]
    assert sorted(set(reads)) == sorted(keys) and len(reads) == len(keys)  # every tensor read once, by itself
    assert peak[0] <= 2  # never more than two checkpoint tensors resident at once
    assert report.largest_tensor_bytes == max(
        m["data_offsets"][1] - m["data_offsets"][0] for h in Checkpoint(llama_shards).headers.values()
        for m in h.values())


def test_gpt2_conv1d_single_file_and_biases(tmp_path, ids):
    base = tmp_path / "gpt2"
    build_builtin("tiny-gpt2").save_pretrained(base)
    model = trained("tiny-gpt2", "attn.c_attn -> lora(r=4)\nattn.c_proj -> glora(r=2)\nmlp.c_fc -> ia3\n")
    adapterhub.save(model, tmp_path / "b")
    report = merge_checkpoint(str(base), tmp_path / "b", tmp_path / "m")
    assert report.files[-1] == "model.safetensors" and not (tmp_path / "m" / INDEX).exists()
    assert (hf_logits(tmp_path / "m", ids) - logits(model, ids)).abs().max().item() <= 1e-5
    assert any(r.bias for r in report.modules)  # glora's E


def test_builtin_model_name_and_cli_json(tmp_path, ids):
    model = trained("tiny-llama", "attn.* -> lora(r=4)\n")
    adapterhub.save(model, tmp_path / "b")
    from adapterhub.cli import build_cli

    res = CliRunner().invoke(build_cli(), ["merge", str(tmp_path / "b"), "--model", "tiny-llama",
                                           "--out", str(tmp_path / "m"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert len(data["modules"]) == 16 and data["files"] == ["config.json", "generation_config.json",
                                                            "model.safetensors"]
    assert (hf_logits(tmp_path / "m", ids) - logits(model, ids)).abs().max().item() <= 1e-5
    res = CliRunner().invoke(build_cli(), ["merge", str(tmp_path / "b"), "-m", "tiny-llama", "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "not empty; pass --overwrite" in res.output
    (tmp_path / "m" / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    res = CliRunner().invoke(build_cli(), ["merge", str(tmp_path / "b"), "-m", "tiny-llama", "-o", str(tmp_path / "m"),
                                           "--overwrite", "--no-progress"])
    assert res.exit_code == 0 and "16 merged modules" in res.output
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == data["files"]  # stale weight files removed


def test_quantized_bases(tmp_path, llama_shards, ids):
    """on int4: ΔW goes onto the 16-bit weights by default, onto deq(Q) (the adapted model) on request;
    QA-LoRA (which needs its quantized base to be built) merges too."""
    model = trained("tiny-llama", "attn.* -> qalora(r=4) on int4(group=16)\nmlp.* -> dora(r=2) on int8\n"
                                  "lm_head -> freeze on int8\n")
    adapterhub.save(model, tmp_path / "b")
    merge_checkpoint(str(llama_shards), tmp_path / "b", tmp_path / "deq", quant_base="dequantized")
    assert (hf_logits(tmp_path / "deq", ids) - logits(model, ids)).abs().max().item() <= 1e-5
    report = merge_checkpoint(str(llama_shards), tmp_path / "b", tmp_path / "orig")
    assert report.notes and "full-precision" in report.notes[0]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "orig")
    plain = build_builtin("tiny-llama")
    for name in ("model.layers.1.self_attn.k_proj", "model.layers.2.mlp.up_proj"):
        layer = model.get_submodule(name)
        want = plain.get_submodule(name).weight + layer.delta_weight().detach()
        assert (merged.get_submodule(name).weight - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("spec", ["attn.{q_proj,v_proj} -> vera(r=8)\nmlp.* -> tied_lora(r=4)\n",
                                  "attn.* -> loftq(r=4) on nf4\n"])
def test_shared_tensors_and_joint_quantization(tmp_path, ids, spec):
    """VeRA/Tied-LoRA tensors are owned by the layer that saved them; LoftQ merges into its own deq(Q)."""
    model = trained("tiny-llama", spec)
    adapterhub.save(model, tmp_path / "b")
    report = merge_checkpoint("tiny-llama", tmp_path / "b", tmp_path / "m")
    assert (hf_logits(tmp_path / "m", ids) - logits(model, ids)).abs().max().item() <= 1e-5
    assert all(r.base == ("dequantized" if "loftq" in spec else "original") for r in report.modules)


def test_peft_saved_adapter(tmp_path, llama_shards, ids):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(build_builtin("tiny-llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "down_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "p")
    merge_checkpoint(str(llama_shards), tmp_path / "p", tmp_path / "m")
    want = logits(pm.eval(), ids)
    assert (hf_logits(tmp_path / "m", ids) - want).abs().max().item() <= 1e-5


def test_refusals_leave_no_model(tmp_path, llama_shards):
    adapterhub.save(trained("tiny-llama", "attn.q_proj -> glora(r=2)\n"), tmp_path / "g")
    with pytest.raises(AdapterhubError, match="changes the bias of module .* which has none"):
        merge_checkpoint(str(llama_shards), tmp_path / "g", tmp_path / "m")
    assert not list((tmp_path / "m").iterdir())
    adapterhub.save(trained("tiny-llama", "attn.o_proj -> bottleneck(size=4)\n"), tmp_path / "bn")
    with pytest.raises(AdapterhubError, match="bottleneck adapters .* no weight-space form"):
        merge_checkpoint(str(llama_shards), tmp_path / "bn", tmp_path / "m")
    adapterhub.save(trained("tiny-gpt2", "lm_head -> lora(r=2)\n"), tmp_path / "tied")
    with pytest.raises(AdapterhubError, match="tied to 'transformer.wte'"):
        merge_checkpoint("tiny-gpt2", tmp_path / "tied", tmp_path / "m")
    with pytest.raises(AdapterhubError, match="made for another base model"):
        merge_checkpoint(str(llama_shards), tmp_path / "tied", tmp_path / "m")
