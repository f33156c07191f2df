"""The ``lora_fa`` variant: the custom autograd Function, what the backward keeps, frozen A, merge.

Expected values are computed here from the tensors: ``y = x W0^T + b + s (x A^T) B^T``.
What a forward saves for backward is read with ``torch.autograd.graph.saved_tensors_hooks``;
parameters (saved weights) are not activations and are left out of the byte counts.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins.lora import LoraLayer
from adapterhub.plugins.lora_fa import LoraFAFunction, LoraFALayer, LoraFAParams, lora_fa_update
from adapterhub.registry import ModuleTypeError, ParamError, bind, get_registry

from .variant_cases import base_weight_out_in as w0_out_in


def saved_activations(fn, params):
    """Run ``fn`` recording what autograd saves: ``(bytes of non-parameter storages, their shapes, out)``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    storages: dict[int, int] = {}
    shapes: list[tuple[int, ...]] = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            storages[ptr] = t.untyped_storage().nbytes()
            shapes.append(tuple(t.shape))
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(storages.values()), shapes, out


def make_base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(48, 20)
    if kind == "conv1d":
        conv = Conv1D(nf=20, nx=48)
        with torch.no_grad():
            conv.bias.normal_()
        return conv
    if kind == "nf4":
        q = get_registry().quantizers["nf4"]
        return q.quantize(nn.Linear(64, 32), q.Params())
    raise AssertionError(kind)



def perturbed(layer: LoraFALayer, seed: int = 3) -> LoraFALayer:
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=torch.Generator().manual_seed(seed)))
    return layer


# --------------------------------------------------------------------------- the Function


@pytest.mark.parametrize("a_trainable", [False, True])
def test_function_gradcheck_float64(a_trainable):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(3, 7, dtype=torch.float64, generator=g, requires_grad=a_trainable)
    b = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: LoraFAFunction.apply(x, a, b, 0.75), (x, a, b))


def test_function_gradients_equal_plain_autograd():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 10, generator=g)
    a = torch.randn(4, 10, generator=g)
    b = torch.randn(8, 4, generator=g)
    grad_out = torch.randn(4, 6, 8, generator=g)
    x1, b1 = x.clone().requires_grad_(), b.clone().requires_grad_()
    y1 = lora_fa_update(x1, a, b1, 2.5)
    y1.backward(grad_out)
    x2, b2 = x.clone().requires_grad_(), b.clone().requires_grad_()
    y2 = 2.5 * (x2 @ a.t()) @ b2.t()
    y2.backward(grad_out)
    assert torch.allclose(y1, y2, atol=1e-5)
    assert torch.allclose(x1.grad, x2.grad, atol=1e-4)
    assert torch.allclose(b1.grad, b2.grad, atol=1e-4)


def test_function_saves_ax_not_x():
    x = torch.randn(3, 11, 40, requires_grad=True)
    a = nn.Parameter(torch.randn(6, 40), requires_grad=False)
    b = nn.Parameter(torch.randn(9, 6))
    nbytes, shapes, _ = saved_activations(lambda: lora_fa_update(x, a, b, 1.0), [a, b])
    assert shapes == [(3, 11, 6)]
    assert nbytes == 3 * 11 * 6 * 4


# --------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_forward_and_gradients_match_the_formula(kind):
    layer = perturbed(LoraFALayer(make_base(kind), r=4, alpha=8))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(2), requires_grad=True)
    y = layer(x)
    grad_out = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(grad_out)
    a = layer.lora_A.weight.detach()
    b = layer.lora_B.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    bias = layer.base_layer.bias
    y2 = x2 @ w0_out_in(layer).detach().t() + bias.detach() + 2.0 * (x2 @ a.t()) @ b.t()
    y2.backward(grad_out)
    assert torch.allclose(y, y2, atol=1e-5)
    assert torch.allclose(x.grad, x2.grad, atol=1e-4)
    assert torch.allclose(layer.lora_B.weight.grad, b.grad, atol=1e-4)
    assert layer.lora_A.weight.grad is None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_backward_keeps_less_than_lora_and_never_x(kind):
    base = make_base(kind)
    fa = perturbed(LoraFALayer(copy.deepcopy(base), r=4))
    lora = LoraLayer(copy.deepcopy(base), r=4)
    x = torch.randn(3, 7, 48, requires_grad=True)
    fa_bytes, fa_shapes, y = saved_activations(lambda: fa(x), list(fa.parameters()))
    lora_bytes, lora_shapes, _ = saved_activations(lambda: lora(x), list(lora.parameters()))
    n, d_in = 3 * 7, 48
    assert fa_bytes < lora_bytes
    assert all(s != tuple(x.shape) and s != (n, d_in) for s in fa_shapes), fa_shapes
    assert any(s in (tuple(x.shape), (n, d_in)) for s in lora_shapes), lora_shapes  # plain LoRA keeps x
    assert fa_bytes == n * 4 * 4  # only A x: N x r floats
    y.sum().backward()  # the saved tensors suffice for the backward
    assert fa.lora_B.weight.grad is not None and x.grad is not None


def test_frozen_base_linear_saves_only_its_weight():
    """What the brief asked to verify: torch's linear keeps x only when W requires grad."""
    w = nn.Parameter(torch.randn(8, 16), requires_grad=False)
    x = torch.randn(4, 16, requires_grad=True)
    nbytes, shapes, _ = saved_activations(lambda: nn.functional.linear(x, w), [w])
    assert nbytes == 0 and shapes == []


def test_a_is_frozen_and_only_b_trains():
    layer = LoraFALayer(make_base("linear"), r=4)
    assert not layer.lora_A.weight.requires_grad
    assert [p is layer.lora_B.weight for p in layer.trainable_parameters()] == [True]
    assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.count_nonzero(layer.lora_A.weight) > 0


def test_training_step_moves_b_only():
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> lora_fa(r=4, alpha=8)")
    layers = list(adapterhub.adapter_layers(model))
    a_before = {n: lyr.lora_A.weight.detach().clone() for n, lyr in layers}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    for name, lyr in layers:
        assert torch.equal(lyr.lora_A.weight, a_before[name]), name
        assert lyr.lora_A.weight.grad is None
        assert torch.count_nonzero(lyr.lora_B.weight) > 0, name


def test_trainable_count_is_r_times_out():
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> lora_fa(r=4)")
    expected = sum(4 * lyr.out_features for _, lyr in adapterhub.adapter_layers(model))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert adapterhub.plan("tiny-llama", "attn.* -> lora_fa(r=4)").trainable == expected


@pytest.mark.parametrize("kind", ["linear", "conv1d", "nf4"])
def test_merge_is_exact(kind):
    layer = perturbed(LoraFALayer(make_base(kind), r=4, alpha=8, rslora=True))
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(5))
    s = 8 / 2.0
    expected_w = w0_out_in(layer).detach() + s * layer.lora_B.weight.detach() @ layer.lora_A.weight.detach()
    with torch.no_grad():
        before = layer(x)
        layer.merge()
        assert torch.allclose(w0_out_in(layer), expected_w, atol=1e-5)
        assert torch.allclose(layer(x), before, atol=1e-4)
        layer.unmerge()
        assert torch.allclose(layer(x), before, atol=1e-5)


def test_save_load_keeps_the_frozen_a(tmp_path):
    model = adapterhub.apply(build_builtin("tiny-gpt2"), "attn.* -> lora_fa(r=4)", seed=1)
    adapterhub.save(model, tmp_path / "b")
    fresh = adapterhub.apply(build_builtin("tiny-gpt2"), "attn.* -> lora_fa(r=4)", seed=2)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_A.weight") for k in tensors)
    loaded = adapterhub.load(build_builtin("tiny-gpt2"), tmp_path / "b")
    for (_, a), (_, b), (_, c) in zip(adapterhub.adapter_layers(model), adapterhub.adapter_layers(loaded),
                                      adapterhub.adapter_layers(fresh)):
        assert torch.equal(a.lora_A.weight, b.lora_A.weight)
        assert not torch.equal(a.lora_A.weight, c.lora_A.weight)  # a different seed draws another A
        assert not b.lora_A.weight.requires_grad


def test_bad_input_is_a_clear_error():
    with pytest.raises(ModuleTypeError, match="lora_fa cannot wrap a Embedding"):
        LoraFALayer(nn.Embedding(10, 4))
    with pytest.raises(ParamError, match="r must be a positive int"):
        bind(LoraFAParams, {"r": 0}, owner="lora_fa")
    with pytest.raises(ParamError, match="lora_fa has no parameter 'dropout'"):
        bind(LoraFAParams, {"dropout": 0.1}, owner="lora_fa")


def test_bfloat16_base_and_autocast():
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = perturbed(LoraFALayer(base, r=4))
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == x.grad.dtype == torch.bfloat16 and layer.lora_B.weight.grad.dtype == torch.float32
    layer32 = perturbed(LoraFALayer(nn.Linear(32, 16), r=4))
    x32 = torch.randn(2, 3, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer32(x32)
    y.float().sum().backward()
    assert x32.grad.dtype == torch.float32 and torch.isfinite(layer32.lora_B.weight.grad).all()
