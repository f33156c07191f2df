"""Stacking: several adapters active at once on one model, switching, weights, merge."""

from __future__ import annotations

import pytest
import torch

import adapterhub
import adapterhub.stacking as S
from adapterhub import AdapterhubError
from adapterhub.models import build_builtin
from adapterhub.stacking import StackLayer, stack

from .test_compose import trained

SPECS = {
    "A": ("tiny-llama", "attn.{q_proj,v_proj} -> lora(r=4, alpha=8)\n", 1),
    "B": ("tiny-llama", "attn.{v_proj,o_proj} -> lora(r=2)\nembed_tokens -> lora(r=2)\n", 2),
    "C": ("tiny-llama", "attn.v_proj -> dora(r=2)\nmlp.* -> ia3\n", 3),
    "V": ("tiny-gpt2", "attn.c_attn -> vera(r=8)\nmlp.c_fc -> vera(r=8)\n", 4),
    "T": ("tiny-gpt2", "attn.* -> tied_lora(r=4)\n", 5),
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("stack")
    for key, (name, spec, seed) in SPECS.items():
        adapterhub.save(trained(name, spec, seed), root / key)
    return {k: root / k for k in SPECS}


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def single(name: str, bundle) -> torch.nn.Module:
    return adapterhub.load(build_builtin(name), bundle)


def test_lora_stack_equals_the_summed_deltas(bundles, ids):
    model = stack(build_builtin("tiny-llama"), [bundles["A"], bundles["B"]], weights=[0.5, 2.0])
    base = build_builtin("tiny-llama")
    with torch.no_grad():
        for w, key in ((0.5, "A"), (2.0, "B")):
            for name, layer in adapterhub.adapter_layers(single("tiny-llama", bundles[key])):
                base.get_submodule(name).weight.add_(w * layer.delta_weight())
    assert (logits(model, ids) - logits(base, ids)).abs().max().item() <= 1e-5


def test_each_module_adds_every_adapters_effect(bundles):
    """Non-additive variants too (DoRA): y = y0 + Σ w_i (y_i - y0), checked module by module."""
    weights = [1.0, -0.5, 0.7]
    model = stack(build_builtin("tiny-llama"), [bundles["A"], bundles["B"], bundles["C"]], weights=weights)
    singles = [single("tiny-llama", bundles[k]) for k in "ABC"]
    plain = build_builtin("tiny-llama")
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    name = "model.layers.2.self_attn.v_proj"  # lora (A), lora (B), dora (C)
    layer = model.get_submodule(name)
    assert isinstance(layer, StackLayer) and sorted(layer.layers()) == [0, 1, 2]
    with torch.no_grad():
        y0 = plain.get_submodule(name)(x)
        want = y0 + sum(w * (m.get_submodule(name)(x) - y0) for w, m in zip(weights, singles, strict=True))
        assert (layer(x) - want).abs().max().item() <= 1e-5
        mlp = "model.layers.0.mlp.down_proj"  # only C: ia3 scales the input, so the base runs on its own input
        xm = torch.randn(2, 128, generator=torch.Generator().manual_seed(1))
        y0 = plain.get_submodule(mlp)(xm)
        want = y0 + 0.7 * (singles[2].get_submodule(mlp)(xm) - y0)
        assert (model.get_submodule(mlp)(xm) - want).abs().max().item() <= 1e-5


def test_switching_adapters_on_and_off(bundles, ids):
    model = adapterhub.stack(build_builtin("tiny-llama"), [bundles["A"], bundles["C"]])  # the public name
    both = logits(model, ids)
    S.set_active(model, [0])
    assert torch.equal(logits(model, ids), logits(single("tiny-llama", bundles["A"]), ids))
    S.set_active(model, [str(bundles["C"])])
    assert torch.equal(logits(model, ids), logits(single("tiny-llama", bundles["C"]), ids))
    S.set_active(model, [])
    assert torch.equal(logits(model, ids), logits(build_builtin("tiny-llama"), ids))
    S.set_active(model, None)
    assert torch.equal(logits(model, ids), both)
    with pytest.raises(AdapterhubError, match="no stacked adapter 5"):
        S.set_active(model, [5])


def test_merged_equals_unmerged_and_unmerge_restores(bundles, ids):
    model = stack(build_builtin("tiny-llama"), [bundles["A"], bundles["B"], bundles["C"]], weights=[1, 0.5, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = logits(model, ids)
    adapterhub.merge(model)
    assert (logits(model, ids) - unmerged).abs().max().item() <= 1e-5
    with pytest.raises(AdapterhubError, match="unmerge"):
        S.set_active(model, [0])
    adapterhub.unmerge(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), unmerged)
    S.unstack(model)
    assert torch.equal(logits(model, ids), logits(build_builtin("tiny-llama"), ids))


def test_names_trainable_tensors_and_one_base_run(bundles, ids):
    model = stack(build_builtin("tiny-llama"), [bundles["A"], bundles["B"]])
    keys = set(model.state_dict())
    q = "model.layers.0.self_attn.v_proj"
    assert {f"{q}.stack.0.lora_A.weight", f"{q}.stack.1.lora_B.weight", f"{q}.base_layer.weight"} <= keys
    assert "model.embed_tokens.stack.1.lora_embedding_A" in keys
    assert all(isinstance(layer, StackLayer) for _, layer in adapterhub.adapter_layers(model))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".stack." in n and "lora_" in n for n in trainable)
    calls = []
    base = model.get_submodule(q).base_layer
    compute = base.forward

    def counting(x, *args, **kwargs):
        calls.append(1)
        return compute(x, *args, **kwargs)

    base.forward = counting
    logits(model, ids)
    assert len(calls) == 1  # two LoRAs on v_proj, the base computed once
    assert base.forward is counting
    model.double()  # .to() reaches the stacked adapters' own tensors (shared with their layers)
    layer = model.get_submodule(q).layers()[0]
    assert layer.lora_A.weight.dtype == torch.float64 and layer.base_layer.weight.dtype == torch.float64
    S.set_active(model, [0])
    want = logits(single("tiny-llama", bundles["A"]).double(), ids)
    assert (logits(model, ids) - want).abs().max().item() <= 1e-12


def test_shared_tensors_gpt2(bundles, ids):
    """VeRA's shared projection and Tied-LoRA's tied factors are rebuilt per stacked adapter."""
    model = stack(build_builtin("tiny-gpt2"), [bundles["V"], bundles["T"]], weights=[1.0, 1.0])
    for i, key in enumerate("VT"):
        S.set_active(model, [i])
        assert torch.equal(logits(model, ids), logits(single("tiny-gpt2", bundles[key]), ids))
    S.set_active(model, None)
    S.set_weights(model, [0.5, 0.25])
    unmerged = logits(model, ids)
    adapterhub.merge(model)
    assert (logits(model, ids) - unmerged).abs().max().item() <= 1e-5


def test_refusals(tmp_path, bundles):
    adapterhub.save(trained("tiny-llama", "layers -> prefix(tokens=4)\n", 1), tmp_path / "p")
    with pytest.raises(AdapterhubError, match="prefix adapters .* beside whole blocks"):
        stack(build_builtin("tiny-llama"), [bundles["A"], tmp_path / "p"])
    adapterhub.save(trained("tiny-llama", "attn.v_proj -> lora(r=2) on int8\n", 1), tmp_path / "q")
    with pytest.raises(AdapterhubError, match="quantize module 'model.layers.0.self_attn.v_proj' differently"):
        stack(build_builtin("tiny-llama"), [bundles["A"], tmp_path / "q"])
    with pytest.raises(AdapterhubError, match="does not have"):
        stack(build_builtin("tiny-llama"), [bundles["V"]])
    with pytest.raises(AdapterhubError, match="2 adapters but 1 weights"):
        stack(build_builtin("tiny-llama"), [bundles["A"], bundles["B"]], weights=[1.0])
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.q_proj -> lora\n")
    with pytest.raises(AdapterhubError, match="already has adapters"):
        stack(model, [bundles["A"]])


def test_quantized_base_is_shared(tmp_path, ids):
    for key, seed in (("q1", 1), ("q2", 2)):
        adapterhub.save(trained("tiny-llama", "attn.v_proj -> lora(r=2) on int8\n", seed), tmp_path / key)
    model = stack(build_builtin("tiny-llama"), [tmp_path / "q1", tmp_path / "q2"])
    S.set_active(model, [1])
    assert torch.equal(logits(model, ids), logits(single("tiny-llama", tmp_path / "q2"), ids))
