"""Applying specs to live models: what trains, equality at init, QLoRA, merge, generate."""

from __future__ import annotations

import pytest
import torch

import adapterhub
from adapterhub import AdapterhubError, AdapterLayer, QuantizedLinear


def logits(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits


def randomize_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapterhub.adapter_layers(model):
            for p in layer.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_apply_equals_base_at_init_and_only_adapters_train(fixture, request, ids):
    model = request.getfixturevalue(fixture)
    before = logits(model, ids)
    adapterhub.apply(model, "attn.* -> lora(r=8, alpha=16)")
    assert torch.equal(logits(model, ids), before)
    layers = list(adapterhub.adapter_layers(model))
    assert len(layers) == 8 if fixture == "tiny_gpt2" else 16
    assert all(isinstance(layer, AdapterLayer) and layer.base_layer is not None for _, layer in layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    plan = model.adapterhub.plan
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == plan.trainable


def test_train_rule_makes_module_trainable(tiny_llama):
    adapterhub.apply(tiny_llama, "attn.* -> lora(r=4)\nlm_head -> train")
    assert tiny_llama.lm_head.weight.requires_grad
    assert not tiny_llama.model.embed_tokens.weight.requires_grad


def test_qlora_base_is_nf4_frozen_and_gradients_flow(tiny_llama, ids):
    base = logits(tiny_llama, ids)
    adapterhub.apply(tiny_llama, "mlp.* -> lora(r=4, alpha=8) on nf4")
    layer = tiny_llama.model.layers[0].mlp.gate_proj
    assert isinstance(layer, AdapterLayer) and isinstance(layer.base_layer, QuantizedLinear)
    assert layer.base_layer.quantizer == "nf4"
    quant_out = logits(tiny_llama, ids)
    assert (quant_out - base).abs().max() > 0  # the MLP really is quantized
    assert torch.allclose(quant_out, base, atol=0.5)
    randomize_adapters(tiny_llama)
    loss = tiny_llama(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for _, lyr in adapterhub.adapter_layers(tiny_llama) for p in lyr.trainable_parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for n, p in tiny_llama.named_parameters() if not p.requires_grad)


def test_freeze_on_int8_quantizes_without_adapters(tiny_llama):
    adapterhub.apply(tiny_llama, "mlp.* -> freeze on int8")
    assert isinstance(tiny_llama.model.layers[1].mlp.down_proj, QuantizedLinear)
    assert not any(p.requires_grad for p in tiny_llama.parameters())


def test_merge_and_unmerge_keep_outputs(tiny_llama, ids):
    adapterhub.apply(tiny_llama, "attn.* -> lora(r=8, alpha=16)\nmlp.* -> lora(r=4) on nf4")
    randomize_adapters(tiny_llama)
    adapted = logits(tiny_llama, ids)
    adapterhub.merge(tiny_llama)
    assert all(layer.merged for _, layer in adapterhub.adapter_layers(tiny_llama))
    assert torch.allclose(logits(tiny_llama, ids), adapted, atol=1e-4)
    adapterhub.unmerge(tiny_llama)
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj.base_layer, QuantizedLinear)
    assert torch.allclose(logits(tiny_llama, ids), adapted, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generate_still_works(fixture, request, ids):
    model = request.getfixturevalue(fixture)
    adapterhub.apply(model, "attn.* -> lora(r=4)\nmlp.* -> lora(r=2) on nf4")
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


def test_bert_classifier(tiny_bert, ids):
    before = tiny_bert(input_ids=ids).logits
    adapterhub.apply(tiny_bert, "attn.* -> lora(r=4)\nmlp.* -> lora(r=4)\nclassifier -> train")
    with torch.no_grad():
        assert torch.equal(tiny_bert(input_ids=ids).logits, before)
    assert tiny_bert.classifier.weight.requires_grad
    assert len(list(adapterhub.adapter_layers(tiny_bert))) == 4 * (4 + 2)


def test_apply_is_seeded_and_keeps_caller_rng(ids):
    from adapterhub.models import build_builtin

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> lora(r=4)", seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> lora(r=4)", seed=7)
    for (_, la), (_, lb) in zip(adapterhub.adapter_layers(a), adapterhub.adapter_layers(b)):
        assert torch.equal(la.lora_A.weight, lb.lora_A.weight)


def test_apply_twice_is_refused(tiny_llama):
    adapterhub.apply(tiny_llama, "attn.* -> lora(r=4)")
    with pytest.raises(AdapterhubError, match="already has adapters"):
        adapterhub.apply(tiny_llama, "mlp.* -> lora(r=4)")


def test_apply_accepts_spec_path_and_bad_spec_raises_surgery_error(tmp_path, tiny_llama):
    bad = tmp_path / "bad.surgery"
    bad.write_text("attn.* -> lora(r=eight)\n")
    with pytest.raises(adapterhub.SurgeryError) as exc:
        adapterhub.apply(tiny_llama, bad)
    assert str(exc.value).startswith(f"{bad}:1:")
    assert "r must be a positive int, got 'eight'" in str(exc.value)


def test_merge_and_unload_gives_a_plain_model_with_the_same_outputs(tiny_llama, ids):
    adapterhub.apply(tiny_llama, "attn.* -> lora(r=4)\nmlp.* -> lora(r=2) on nf4")
    randomize_adapters(tiny_llama)
    out = logits(tiny_llama, ids)
    adapterhub.merge_and_unload(tiny_llama)
    assert not list(adapterhub.adapter_layers(tiny_llama))
    assert type(tiny_llama.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert torch.allclose(logits(tiny_llama, ids), out, atol=1e-4)


def test_merged_quantized_conv1d_is_a_conv1d_again_and_saves_loadably(tiny_gpt2, ids, tmp_path):
    """GPT-2 with ``lora on nf4`` on its Conv1D layers: merge_and_unload gives Conv1D modules (weights
    ``in x out``), so ``save_pretrained`` writes a checkpoint GPT-2 loads with the same outputs."""
    from transformers import GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    adapterhub.apply(tiny_gpt2, "c_attn -> lora(r=4) on nf4\nc_fc -> lora(r=2)")
    randomize_adapters(tiny_gpt2)
    out = logits(tiny_gpt2, ids)
    adapterhub.merge_and_unload(tiny_gpt2)
    for name in ("c_attn", "c_fc"):
        module = tiny_gpt2.transformer.h[0].get_submodule("attn." + name if name == "c_attn" else "mlp." + name)
        assert type(module) is Conv1D and module.weight.shape[0] == tiny_gpt2.config.n_embd
    assert torch.allclose(logits(tiny_gpt2, ids), out, atol=1e-4)
    tiny_gpt2.save_pretrained(tmp_path / "merged")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(logits(reloaded, ids), out, atol=1e-4)


def test_merge_and_unload_refuses_unmergeable_adapters_before_changing_anything(tiny_llama):
    adapterhub.apply(tiny_llama, "attn.* -> lora(r=4)\nmlp.down_proj -> bottleneck(size=4)")
    with pytest.raises(adapterhub.AdapterhubError, match="cannot be merged"):
        adapterhub.merge_and_unload(tiny_llama)
    assert not any(layer.merged for _, layer in adapterhub.adapter_layers(tiny_llama))


def test_quantized_base_keeps_no_dequantized_weight_for_backward(tiny_llama, ids):
    """QLoRA's memory: autograd must not hold the 16-bit copy of a frozen 4-bit weight."""
    adapterhub.apply(tiny_llama, "mlp.* -> lora(r=4) on nf4")
    layer = tiny_llama.model.layers[0].mlp.up_proj
    weight_shape = (layer.out_features, layer.in_features)
    saved = []
    x = torch.randn(2, 5, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer.base_layer(x)
    assert weight_shape not in saved and (weight_shape[1], weight_shape[0]) not in saved
    y.sum().backward()
    expected = torch.ones(2, 5, 128) @ layer.base_layer.dequantize()
    assert torch.allclose(x.grad, expected, atol=1e-5)
