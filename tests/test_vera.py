"""``vera``: only d and b train, the shared projection is drawn bit-exactly from the seed (as PEFT
draws it), save_projection on/off round trips, exact merge, and the same outputs as PEFT's VeRA."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.registry import ApplyContext, ParamError, bind, get_registry


def variant():
    return get_registry().variants["vera"]


def params(**kw):
    return bind(variant().Params, kw, owner="vera")


def layers(model):
    return dict(adapterhub.adapter_layers(model))


def expected_projection(r, in_max, out_max, seed):
    """A then B from one CPU generator, uniform(-sqrt(6/fan_in), +sqrt(6/fan_in)) (PEFT's _kaiming_init)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.empty(r, in_max).uniform_(-math.sqrt(6 / in_max), math.sqrt(6 / in_max), generator=gen)
    B = torch.empty(out_max, r).uniform_(-math.sqrt(6 / r), math.sqrt(6 / r), generator=gen)
    return A, B


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers(model).values():
            layer.vera_lambda_d.add_(torch.randn(layer.r, generator=g))
            layer.vera_lambda_b.add_(torch.randn(layer.out_features, generator=g))


def test_params():
    p = params()
    assert (p.r, p.d_init, p.seed, p.save_projection) == (256, 0.1, 0, True)
    with pytest.raises(ParamError, match="d_init") as exc:
        params(d_init=0.0)
    assert exc.value.param == "d_init"
    with pytest.raises(ParamError, match="seed"):
        params(seed=-1)
    with pytest.raises(ParamError, match="r"):
        params(r=0)


def test_only_d_and_b_train_with_the_papers_init():
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> vera(r=16, d_init=0.5)")
    n = 0
    for name, layer in layers(model).items():
        assert {k for k, p in layer.named_parameters() if p.requires_grad} == {"vera_lambda_d", "vera_lambda_b"}
        assert [k for k, _ in layer.named_parameters() if not k.startswith("base_layer.")] == [
            "vera_lambda_d", "vera_lambda_b"], name
        assert torch.equal(layer.vera_lambda_d, torch.full((16,), 0.5))
        assert torch.equal(layer.vera_lambda_b, torch.zeros(layer.out_features))
        assert not layer.vera_A.requires_grad and not layer.vera_B.requires_grad
        n += 16 + layer.out_features
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == n == model.adapterhub.plan.trainable


def test_projection_is_shared_sized_by_the_wrapped_maxima_and_drawn_from_the_seed():
    # attention (64 -> 64, 64 -> 32) and MLP (64 -> 128, 128 -> 64): in_max = out_max = 128
    model = adapterhub.apply(build_builtin("tiny-llama"), "layers.*.* -> vera(r=8, seed=3)")
    ls = list(layers(model).values())
    proj = ls[0].vera_projection
    assert all(layer.vera_projection is proj for layer in ls)
    assert (proj.in_max, proj.out_max) == (128, 128)
    A, B = expected_projection(8, 128, 128, seed=3)
    assert torch.equal(proj.vera_A, A) and torch.equal(proj.vera_B, B)
    other = adapterhub.apply(build_builtin("tiny-llama"), "layers.*.* -> vera(r=8, seed=4)")
    assert not torch.equal(next(iter(layers(other).values())).vera_A, A)
    only_attn = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> vera(r=8, seed=3)")
    assert next(iter(layers(only_attn).values())).vera_A.shape == (8, 64)


def test_projection_stays_one_tensor_through_to():
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> vera(r=8)").double()
    ls = list(layers(model).values())
    assert ls[0].vera_A.dtype == torch.float64
    assert all(layer.vera_A is ls[0].vera_A for layer in ls)


def test_forward_uses_the_sliced_projection():
    model = adapterhub.apply(build_builtin("tiny-gpt2"), "attn.* -> vera(r=8)")
    perturb(model)
    layer = layers(model)["transformer.h.0.attn.c_proj"]  # 64 -> 64 of a 64 x 192 projection
    assert layer.vera_B.shape == (192, 8)
    x = torch.randn(2, 3, 64)
    A, B = layer.vera_A[:, :64], layer.vera_B[:64]
    base = layer.base_layer
    want = x @ base.weight + base.bias + layer.vera_lambda_b * (((x @ A.t()) * layer.vera_lambda_d) @ B.t())
    with torch.no_grad():
        assert torch.allclose(layer(x), want, atol=1e-5)


@pytest.mark.parametrize("family, spec, name", [
    ("tiny-llama", "layers.*.* -> vera(r=8)", "model.layers.1.mlp.down_proj"),
    ("tiny-gpt2", "attn.* -> vera(r=8)", "transformer.h.0.attn.c_attn"),
])
def test_merge_is_exact(family, spec, name):
    model = adapterhub.apply(build_builtin(family), spec)
    perturb(model)
    layer = layers(model)[name]
    n_in, n_out = layer.in_features, layer.out_features
    d, b = torch.diag(layer.vera_lambda_d), torch.diag(layer.vera_lambda_b)
    want = b @ layer.vera_B[:n_out] @ d @ layer.vera_A[:, :n_in]
    got = layer.delta_weight()
    if family == "tiny-gpt2":
        got = got.t()
    assert torch.allclose(got, want, atol=1e-6)
    w0 = layer.base_weight().detach().clone()
    x = torch.randn(4, n_in)
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert torch.allclose(layer.base_weight(), w0 + want, atol=1e-6)
        assert torch.allclose(layer(x), before, atol=1e-5)
        layer.unmerge()
        assert torch.allclose(layer.base_weight(), w0, atol=1e-6)


def test_save_projection_true_stores_it_once_and_load_uses_it(tmp_path, ids):
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> vera(r=8)")
    perturb(model)
    proj = next(iter(layers(model).values())).vera_projection
    with torch.no_grad():
        proj.vera_A.mul_(3.0)  # no longer what the seed gives: loading must take the saved tensors
    adapterhub.save(model, tmp_path / "b")
    saved = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert sum(k.endswith(".vera_A") for k in saved) == 1 and sum(k.endswith(".vera_B") for k in saved) == 1
    fresh = adapterhub.load(build_builtin("tiny-llama"), tmp_path / "b")
    assert torch.equal(next(iter(layers(fresh).values())).vera_A, proj.vera_A)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_save_projection_false_keeps_only_d_b_and_regenerates_bit_exactly(tmp_path, ids):
    model = adapterhub.apply(build_builtin("tiny-gpt2"), "attn.* -> vera(r=8, save_projection=false)")
    perturb(model)
    for layer in layers(model).values():
        assert set(layer.adapter_state_dict()) == {"vera_lambda_d", "vera_lambda_b"}
        assert not any("vera_A" in k or "vera_B" in k for k in layer.state_dict())
    adapterhub.save(model, tmp_path / "b")
    saved = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert {k.rsplit(".", 1)[1] for k in saved} == {"vera_lambda_d", "vera_lambda_b"}
    fresh = adapterhub.load(build_builtin("tiny-gpt2"), tmp_path / "b")
    old, new = next(iter(layers(model).values())), next(iter(layers(fresh).values()))
    assert torch.equal(old.vera_A, new.vera_A) and torch.equal(old.vera_B, new.vera_B)
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)


def test_unsupported_module_types():
    with pytest.raises(adapterhub.SurgeryError, match="vera cannot wrap"):
        adapterhub.plan("tiny-llama", "embed_tokens -> vera(r=4)")
    with pytest.raises(adapterhub.AdapterhubError, match="vera cannot wrap module 'emb'"):
        variant().wrap(nn.Embedding(5, 4), params(), ApplyContext(), "emb")


def test_same_projection_and_outputs_as_peft(ids):
    peft = pytest.importorskip("peft")
    ours = adapterhub.apply(build_builtin("tiny-llama"), "{q,v}_proj -> vera(r=8, seed=7)")
    theirs = peft.get_peft_model(build_builtin("tiny-llama"), peft.VeraConfig(
        r=8, target_modules=["q_proj", "v_proj"], projection_prng_key=7, d_initial=0.1))
    theirs_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
                     if type(m).__name__ == "Linear" and hasattr(m, "vera_lambda_d")}
    perturb(ours)
    mine = layers(ours)
    assert set(mine) == set(theirs_layers)
    for name, layer in mine.items():
        peft_layer = theirs_layers[name]
        assert torch.equal(layer.vera_A, peft_layer.vera_A["default"])
        assert torch.equal(layer.vera_B, peft_layer.vera_B["default"])
        with torch.no_grad():
            peft_layer.vera_lambda_d["default"].copy_(layer.vera_lambda_d)
            peft_layer.vera_lambda_b["default"].copy_(layer.vera_lambda_b)
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)
