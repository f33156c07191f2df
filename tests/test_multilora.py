"""The ``multilora`` variant: init (different draws, no dead gradients), the rank-nr form, merge.

Expected values are computed here from the tensors:
``y = x W0^T + b + (alpha/r) sum_i s_i * ((x A_i^T) B_i^T)``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins.multilora import MultiLoraLayer, MultiLoraParams
from adapterhub.registry import ModuleTypeError, ParamError, bind, get_registry

from .variant_cases import base_weight_out_in as w0_out_in


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(24, 10)
    if kind == "conv1d":
        conv = Conv1D(nf=10, nx=24)
        with torch.no_grad():
            conv.bias.normal_()
        return conv
    if kind == "nf4":
        q = get_registry().quantizers["nf4"]
        return q.quantize(nn.Linear(64, 32), q.Params())
    raise AssertionError(kind)



def with_scales(layer: MultiLoraLayer, seed: int = 1) -> MultiLoraLayer:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in layer.lora_scale:
            s.copy_(torch.randn(s.shape, generator=g))
    return layer


def sum_form(layer: MultiLoraLayer, x: torch.Tensor) -> torch.Tensor:
    y = x @ w0_out_in(layer).t() + layer.base_layer.bias
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.lora_scale):
        y = y + (layer.alpha / layer.r) * s * ((x @ a.weight.t()) @ b.weight.t())
    return y


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_forward_equals_the_concatenated_rank_nr_lora(kind):
    layer = with_scales(MultiLoraLayer(make_base(kind), n=3, r=2, alpha=6))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2))
    a_cat = torch.cat([a.weight for a in layer.lora_A])  # [A_1; ...; A_n]
    b_cat = torch.cat([s[:, None] * b.weight for b, s in zip(layer.lora_B, layer.lora_scale)], dim=1)
    assert a_cat.shape == (6, layer.in_features) and b_cat.shape == (layer.out_features, 6)
    rank_nr = x @ w0_out_in(layer).t() + layer.base_layer.bias + 3.0 * (x @ a_cat.t()) @ b_cat.t()
    with torch.no_grad():
        y = layer(x)
        assert torch.allclose(y, rank_nr, atol=1e-5)
        assert torch.allclose(y, sum_form(layer, x), atol=1e-5)


def test_init_is_zero_update_with_nonzero_different_modules():
    layer = MultiLoraLayer(make_base("linear"), n=3, r=4)
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
    assert all(torch.count_nonzero(s) == 0 for s in layer.lora_scale)
    for group in (layer.lora_A, layer.lora_B):
        ws = [m.weight for m in group]
        assert all(torch.count_nonzero(w) == w.numel() for w in ws)
        for i in range(len(ws)):
            for j in range(i + 1, len(ws)):
                assert not torch.allclose(ws[i], ws[j]), (i, j)
    bound_a, bound_b = 1 / 24 ** 0.5, 1 / 4 ** 0.5  # kaiming_uniform(a=sqrt 5): U(-1/sqrt(fan_in), ...)
    assert all(m.weight.abs().max() <= bound_a for m in layer.lora_A)
    assert all(m.weight.abs().max() <= bound_b for m in layer.lora_B)


def test_no_dead_gradients():
    """First backward: every s_i gets g * (B_i A_i x) != 0 (A_i, B_i get s_i-proportional, i.e. zero,
    gradient). After one update of s, every tensor gets a non-zero gradient. With LoRA's B = 0 the
    same s = 0 start would be dead: no tensor would ever get a gradient."""
    torch.manual_seed(0)
    layer = MultiLoraLayer(make_base("linear"), n=3, r=4, alpha=8)
    x = torch.randn(6, 24)
    target = torch.randn(6, 10)
    loss = ((layer(x) - target) ** 2).sum()
    loss.backward()
    g = 2 * (layer.base_layer(x) - target).detach()
    for a, b, s in zip(layer.lora_A, layer.lora_B, layer.lora_scale):
        expected = 2.0 * (g * ((x @ a.weight.t()) @ b.weight.t())).sum(0)
        assert torch.allclose(s.grad, expected, atol=1e-4)
        assert torch.count_nonzero(s.grad) == s.numel()
        assert torch.count_nonzero(a.weight.grad) == 0 and torch.count_nonzero(b.weight.grad) == 0
    opt = torch.optim.SGD(layer.trainable_parameters(), lr=1e-3)
    opt.step()
    opt.zero_grad()
    ((layer(x) - target) ** 2).sum().backward()
    for name, p in layer.named_parameters():
        if not name.startswith("base_layer."):
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name

    dead = MultiLoraLayer(make_base("linear"), n=3, r=4, alpha=8)
    with torch.no_grad():
        for b in dead.lora_B:
            b.weight.zero_()
    ((dead(x) - target) ** 2).sum().backward()
    assert all(torch.count_nonzero(p.grad) == 0 for n, p in dead.named_parameters() if not n.startswith("base_"))


def test_apply_draws_differ_across_modules_and_layers():
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.q_proj -> multilora(n=2, r=4)")
    a0 = [lyr.lora_A[0].weight for _, lyr in adapterhub.adapter_layers(model)]
    assert len(a0) == 4
    assert not torch.allclose(a0[0], a0[1])


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_merge_is_exact(kind):
    layer = with_scales(MultiLoraLayer(make_base(kind), n=2, r=3, alpha=6))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(5))
    delta = sum(torch.diag(s) @ b.weight @ a.weight for a, b, s in zip(layer.lora_A, layer.lora_B, layer.lora_scale))
    expected_w = w0_out_in(layer).detach() + 2.0 * delta.detach()
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert torch.allclose(w0_out_in(layer), expected_w, atol=1e-5)
        assert torch.allclose(layer(x), before, atol=1e-4)
        layer.unmerge()
        assert torch.allclose(layer(x), before, atol=1e-5)


def test_tensor_names_and_count():
    model = adapterhub.apply(build_builtin("tiny-gpt2"), "attn.c_attn -> multilora(n=3, r=4)")
    _, layer = next(iter(adapterhub.adapter_layers(model)))
    names = set(layer.adapter_state_dict())
    assert names == {f"{t}.{i}{w}" for i in range(3) for t, w in
                     (("lora_A", ".weight"), ("lora_B", ".weight"), ("lora_scale", ""))}
    d_in, d_out = 64, 192
    per_layer = 3 * (4 * (d_in + d_out) + d_out)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == per_layer * len(list(adapterhub.adapter_layers(model)))
    assert adapterhub.plan("tiny-gpt2", "attn.c_attn -> multilora(n=3, r=4)").trainable == total


def test_dropout_only_in_training():
    layer = with_scales(MultiLoraLayer(make_base("linear"), n=2, r=4, dropout=0.5))
    x = torch.randn(4, 24)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer(x), sum_form(layer, x), atol=1e-5)
        layer.train()
        assert not torch.allclose(layer(x), sum_form(layer, x), atol=1e-5)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ModuleTypeError, match="multilora cannot wrap a Embedding"):
        MultiLoraLayer(nn.Embedding(10, 4))
    with pytest.raises(ParamError, match="n must be a positive int"):
        bind(MultiLoraParams, {"n": 0}, owner="multilora")
    with pytest.raises(ParamError, match="dropout must be"):
        bind(MultiLoraParams, {"dropout": 1.0}, owner="multilora")
