"""``tied_lora``: tying (one Parameter per shape, summed gradients), configurations, exact merge,
plan counts, bundles. Expected values are computed here from the paper's formula."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.registry import ApplyContext, ParamError, bind, get_registry

LETTERS = {"v": "tied_lora_v", "B": "tied_lora_B", "u": "tied_lora_u", "A": "tied_lora_A"}


def variant():
    return get_registry().variants["tied_lora"]


def params(**kw):
    return bind(variant().Params, kw, owner="tied_lora")


def layers(model):
    return dict(adapterhub.adapter_layers(model))


def delta_formula(layer):
    s = layer.alpha / layer.r
    return s * torch.diag(layer.tied_lora_v) @ layer.tied_lora_B @ torch.diag(layer.tied_lora_u) @ layer.tied_lora_A


def test_params_defaults_and_config_normalisation():
    p = params()
    assert (p.r, p.alpha, p.config) == (8, 8.0, "vBuA")
    assert params(config="AuBv").config == "vBuA"
    assert params(config="TL6").config == "vBuA"
    assert params(config="bv").config == "vB"
    assert params(config="ua").config == "uA"


@pytest.mark.parametrize("bad, match", [("", "letters from v, B, u, A"), ("vBx", "letters from v, B, u, A"),
                                        ("vv", "twice"), ("TL3", "only TL6")])
def test_bad_config_is_a_param_error(bad, match):
    with pytest.raises(ParamError, match=match) as exc:
        params(config=bad)
    assert exc.value.param == "config"


def test_bad_rank_and_alpha():
    with pytest.raises(ParamError, match="r"):
        params(r=0)
    with pytest.raises(ParamError, match="alpha"):
        params(alpha=-1.0)


def test_tie_groups_share_the_same_parameter_objects():
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> tied_lora(r=4)")
    ls = layers(model)
    by_shape: dict[tuple[int, int], list] = {}
    for layer in ls.values():
        by_shape.setdefault((layer.in_features, layer.out_features), []).append(layer)
    assert set(by_shape) == {(64, 64), (64, 32)}  # q/o and k/v
    for group in by_shape.values():
        assert len(group) == 8
        assert all(lyr.tied_lora_A is group[0].tied_lora_A and lyr.tied_lora_B is group[0].tied_lora_B
                   for lyr in group)
        assert len({id(lyr.tied_lora_u) for lyr in group}) == 8  # u, v stay per layer
        assert sum(lyr.owns_tied for lyr in group) == 1
    qo, kv = by_shape[(64, 64)][0], by_shape[(64, 32)][0]
    assert qo.tied_lora_A is not kv.tied_lora_A
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = 2 * 4 * 64 + 4 * (64 + 32) + 2 * 4 * 64 + 2 * 4 * 32 + 16 * 4  # A's, B's, v's, u's
    assert sum(p.numel() for p in trainable) == expected == model.adapterhub.plan.trainable


def test_different_params_make_different_tie_groups():
    model = adapterhub.apply(build_builtin("tiny-llama"),
                             "q_proj -> tied_lora(r=4)\no_proj -> tied_lora(r=4, alpha=2)")
    ls = layers(model)
    q, o = ls["model.layers.0.self_attn.q_proj"], ls["model.layers.0.self_attn.o_proj"]
    assert q.tied_lora_A is not o.tied_lora_A
    assert q.tied_lora_A is ls["model.layers.3.self_attn.q_proj"].tied_lora_A


def test_tied_gradients_are_summed_over_layers():
    ctx = ApplyContext()
    torch.manual_seed(0)
    bases = [nn.Linear(12, 9) for _ in range(3)]
    p = params(r=3, alpha=6.0)
    tied = [variant().wrap(b, p, ctx, f"l{i}") for i, b in enumerate(bases)]
    for t in tied:
        t.base_layer.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        tied[0].tied_lora_B.normal_(generator=g)
        for t in tied:
            t.tied_lora_u.add_(torch.randn(3, generator=g))
            t.tied_lora_v.add_(torch.randn(9, generator=g))
    xs = [torch.randn(4, 12, generator=g) for _ in tied]
    sum((t(x) ** 2).sum() for t, x in zip(tied, xs)).backward()
    # the same function with an independent copy of A and B per layer
    grads_A, grads_B = [], []
    for t, x in zip(tied, xs):
        A = t.tied_lora_A.detach().clone().requires_grad_()
        B = t.tied_lora_B.detach().clone().requires_grad_()
        y = t.base_layer(x) + 2.0 * (((x @ A.t()) * t.tied_lora_u.detach()) @ B.t()) * t.tied_lora_v.detach()
        (y ** 2).sum().backward()
        grads_A.append(A.grad)
        grads_B.append(B.grad)
    assert torch.allclose(tied[0].tied_lora_A.grad, sum(grads_A), atol=1e-5, rtol=1e-5)
    assert torch.allclose(tied[0].tied_lora_B.grad, sum(grads_B), atol=1e-5, rtol=1e-5)


CONFIGS = ["vBuA", "vB", "BA", "vBA", "vu", "uA", "A", "u", "v", "B"]


@pytest.mark.parametrize("config", CONFIGS)
def test_config_trains_exactly_its_letters_and_starts_at_base(config, ids):
    base = build_builtin("tiny-llama")
    with torch.no_grad():
        want = base(input_ids=ids).logits
    model = adapterhub.apply(build_builtin("tiny-llama"), f"attn.* -> tied_lora(r=4, config=\"{config}\")")
    for name, layer in layers(model).items():
        assert {n for n, p in layer.named_parameters() if p.requires_grad} == {LETTERS[c] for c in config}, name
        assert torch.count_nonzero(delta_formula(layer)) == 0
        A, B, u, v = layer.tied_lora_A, layer.tied_lora_B, layer.tied_lora_u, layer.tied_lora_v
        # frozen factors keep the paper's frozen values: u = v = 1, A and B random
        if "u" not in config:
            assert torch.equal(u, torch.ones_like(u))
        if "v" not in config:
            assert torch.equal(v, torch.ones_like(v))
        if "A" not in config:
            assert torch.count_nonzero(A) == A.numel()
        if "B" not in config:
            assert torch.count_nonzero(B) == B.numel()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    planned = adapterhub.plan("tiny-llama", model.adapterhub.plan.spec).trainable
    assert total == model.adapterhub.plan.trainable == planned


@pytest.mark.parametrize("config, zero", [("vBuA", "B"), ("vuA", "v"), ("vu", "v"), ("uA", "u"), ("A", "A")])
def test_the_zero_factor_trains_from_the_first_step(config, zero, ids):
    """ΔW = 0 comes from one trainable factor set to 0 (B, else v, else u, else A); it gets a gradient."""
    model = adapterhub.apply(build_builtin("tiny-llama"), f"q_proj -> tied_lora(r=4, config=\"{config}\")")
    layer = layers(model)["model.layers.0.self_attn.q_proj"]
    zero_t = getattr(layer, LETTERS[zero])
    assert torch.count_nonzero(zero_t) == 0
    others = [getattr(layer, LETTERS[c]) for c in "vBuA" if c != zero]
    assert all(torch.count_nonzero(t) == t.numel() for t in others)
    model(input_ids=ids).logits.square().mean().backward()
    assert zero_t.grad is not None and torch.count_nonzero(zero_t.grad) > 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_is_exact_per_layer(kind):
    torch.manual_seed(0)
    bases = [nn.Linear(10, 6) if kind == "linear" else Conv1D(nf=6, nx=10) for _ in range(2)]
    ctx = ApplyContext()
    tied = [variant().wrap(b, params(r=3, alpha=4.5), ctx, f"l{i}") for i, b in enumerate(bases)]
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for t in tied:
            for p in (t.tied_lora_A, t.tied_lora_B, t.tied_lora_u, t.tied_lora_v):
                p.add_(torch.randn(p.shape, generator=g))
    x = torch.randn(5, 10, generator=g)
    for t in tied:
        w0 = t.base_weight().detach().clone()  # out x in
        want_delta = delta_formula(t)
        got_delta = t.delta_weight()
        if kind == "conv1d":
            got_delta = got_delta.t()
        assert torch.allclose(got_delta, want_delta, atol=1e-6)
        with torch.no_grad():
            before = t(x)
            t.merge()
            assert torch.allclose(t.base_weight(), w0 + want_delta, atol=1e-6)
            assert torch.allclose(t(x), before, atol=1e-5)
            t.unmerge()
            assert torch.allclose(t.base_weight(), w0, atol=1e-6)


def test_bundle_stores_each_tied_tensor_once(tmp_path, ids):
    model = adapterhub.apply(build_builtin("tiny-gpt2"), "attn.* -> tied_lora(r=4, config=\"vu\")")
    with torch.no_grad():
        for layer in layers(model).values():
            layer.tied_lora_v.add_(0.5)
    adapterhub.save(model, tmp_path / "b")
    saved = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert sum(k.endswith(".tied_lora_A") for k in saved) == 2  # c_attn and c_proj groups
    assert sum(k.endswith(".tied_lora_v") for k in saved) == len(layers(model))
    fresh = adapterhub.load(build_builtin("tiny-gpt2"), tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    f = layers(fresh)
    assert f["transformer.h.0.attn.c_attn"].tied_lora_A is f["transformer.h.1.attn.c_attn"].tied_lora_A


def test_unsupported_module_types():
    with pytest.raises(adapterhub.SurgeryError, match="tied_lora cannot wrap"):
        adapterhub.plan("tiny-llama", "embed_tokens -> tied_lora(r=4)")
    with pytest.raises(adapterhub.AdapterhubError, match="tied_lora cannot wrap module 'emb'"):
        variant().wrap(nn.Embedding(5, 4), params(), ApplyContext(), "emb")


def test_quantized_base(ids):
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> tied_lora(r=4) on nf4")
    layer = layers(model)["model.layers.0.self_attn.q_proj"]
    assert layer.is_quantized
    with torch.no_grad():
        layer.tied_lora_B.normal_()
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        want = x @ (layer.base_weight() + delta_formula(layer)).t()
        assert torch.allclose(layer(x), want, atol=1e-4)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(LETTERS.values())


def test_tying_survives_dtype_and_device_moves():
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> tied_lora(r=4)").double()
    ls = list(layers(model).values())
    q_like = [lyr for lyr in ls if lyr.out_features == 64]
    assert q_like[0].tied_lora_A.dtype == torch.float64
    assert all(lyr.tied_lora_A is q_like[0].tied_lora_A for lyr in q_like)
    assert len({id(p) for p in model.parameters() if p.requires_grad}) == 2 * 2 + 16 * 2
