"""The ``dora`` variant: PEFT equivalence, detached-norm gradients, the Triton row norm, QDoRA merge.

Expected values are computed here from the tensors with the paper's formula
``W' = m (W0 + s B A) / ||W0 + s B A||_row`` (the norm a constant), never by calling the layer.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins import dora as dora_mod
from adapterhub.plugins.dora import DoraLayer, dora_row_norm_torch, dora_row_norm_triton
from adapterhub.registry import ApplyContext, ModuleInfo, ModuleTypeError, ParamError, bind, get_registry

KINDS = ["linear", "conv1d", "nf4"]


def variant():
    return get_registry().variants["dora"]


def make_base(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        lin = nn.Linear(12, 10, dtype=dtype)
        with torch.no_grad():
            lin.bias.normal_()
        return lin
    if kind == "conv1d":
        conv = Conv1D(nf=10, nx=12)  # weight: in x out
        with torch.no_grad():
            conv.bias.normal_()
        return conv
    if kind == "nf4":
        q = get_registry().quantizers["nf4"]
        lin = nn.Linear(64, 32, dtype=dtype)
        with torch.no_grad():
            lin.bias.normal_()
        return q.quantize(lin, q.Params())
    raise AssertionError(kind)


def wrap(base: nn.Module, **params) -> DoraLayer:
    v = variant()
    return v.wrap(base, bind(v.Params, params, owner="dora"), ApplyContext(), "model.layer")


def w0_of(base: nn.Module) -> torch.Tensor:
    """W0 as out x in, read independently of the adapter."""
    if hasattr(base, "dequantize"):
        return base.dequantize()
    return base.weight.t() if isinstance(base, Conv1D) else base.weight


def randomize(layer: DoraLayer, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (layer.lora_A.weight, layer.lora_B.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(layer.out_features, generator=g))


def paper_output(base, x, m, A, B, s):
    """y = (m / n) (W0 + s B A) x + b with n = ||W0 + s B A||_row treated as a constant."""
    w0 = w0_of(base).to(A.dtype)
    direction = w0 + s * B @ A
    n = direction.detach().pow(2).sum(dim=1).sqrt()
    return x @ ((m / n)[:, None] * direction).t() + base.bias


def x_for(layer, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, layer.in_features, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- init / shapes / params


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("kind", KINDS)
def test_init_equals_base_and_m_is_row_norm(kind, init):
    base = make_base(kind)
    x = torch.randn(2, 3, 64 if kind == "nf4" else 12)
    expected = base(x)  # for nf4: the quantized base's own output
    layer = wrap(base, r=4, alpha=16, init=init)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.lora_magnitude_vector.detach(), w0_of(base).float().norm(dim=1))
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_tensor_names_trainable_and_count(kind):
    base = make_base(kind)
    layer = wrap(base, r=5, alpha=5)
    i, o = layer.in_features, layer.out_features
    shapes = {k: tuple(v.shape) for k, v in layer.adapter_state_dict().items()}
    assert shapes == {"lora_A.weight": (5, i), "lora_B.weight": (o, 5), "lora_magnitude_vector": (o,)}
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == set(shapes)
    info = ModuleInfo(name="m", type_name=type(base).__name__, kind="conv1d" if kind == "conv1d" else "linear",
                      in_features=i, out_features=o, own_params=0, weight_bytes=0, dtype="float32", is_leaf=True)
    assert variant().trainable_params(bind(variant().Params, {"r": 5}, owner="dora"), info) == 5 * (i + o) + o


def test_plan_count_and_bad_params():
    p = adapterhub.plan("tiny-llama", "layers.0.self_attn.q_proj -> dora(r=4)")
    assert p.trainable == 4 * (64 + 64) + 64
    with pytest.raises(ParamError, match="r"):
        bind(variant().Params, {"r": 0}, owner="dora")
    with pytest.raises(ParamError, match="dropout"):
        bind(variant().Params, {"dropout": 1.0}, owner="dora")
    with pytest.raises(ParamError, match="init"):
        bind(variant().Params, {"init": "zeros"}, owner="dora")


def test_embedding_is_a_clear_error():
    with pytest.raises(ModuleTypeError, match="dora cannot wrap module 'model.layer' of type Embedding"):
        wrap(nn.Embedding(10, 4), r=2)
    with pytest.raises(adapterhub.SurgeryError, match="dora cannot wrap"):
        adapterhub.plan("tiny-llama", "model.embed_tokens -> dora(r=4)")


# --------------------------------------------------------------------------- forward / merge


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_paper(kind, rslora):
    base = make_base(kind)
    layer = wrap(base, r=4, alpha=6, rslora=rslora)
    randomize(layer)
    s = 6 / math.sqrt(4) if rslora else 6 / 4
    x = x_for(layer)
    with torch.no_grad():
        want = paper_output(base, x, layer.lora_magnitude_vector, layer.lora_A.weight, layer.lora_B.weight, s)
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_bias_is_not_scaled_by_the_magnitude():
    base = make_base("linear")
    layer = wrap(base, r=4)
    randomize(layer)
    x = x_for(layer)
    with torch.no_grad():
        with_bias = layer(x)
        bias = base.bias.clone()
        base.bias.zero_()
        torch.testing.assert_close(with_bias - layer(x), bias.expand_as(with_bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_is_exact_and_unmerge_restores(kind):
    base = make_base(kind)
    original = w0_of(base).detach().clone()
    layer = wrap(base, r=4, alpha=8)
    randomize(layer)
    x = x_for(layer)
    with torch.no_grad():
        A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
        direction = original.float() + 2.0 * B @ A
        expected_w = (m / direction.norm(dim=1))[:, None] * direction
        unmerged = layer(x)
        layer.merge()
        merged_w = layer.base_layer.weight
        if kind == "conv1d":
            merged_w = merged_w.t()
        torch.testing.assert_close(merged_w, expected_w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    if kind == "nf4":
        assert layer.base_layer is base  # the quantized base itself, bit for bit
        assert torch.equal(base.dequantize(), original)
    else:
        torch.testing.assert_close(w0_of(base), original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)


def test_fp64_base_keeps_fp64():
    base = make_base("linear", torch.float64)
    layer = wrap(base, r=3)
    assert layer.lora_magnitude_vector.dtype == torch.float64
    randomize(layer)
    x = x_for(layer).double()
    with torch.no_grad():
        want = paper_output(base, x, layer.lora_magnitude_vector, layer.lora_A.weight.double(),
                            layer.lora_B.weight.double(), 8 / 3)
        torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_treat_the_norm_as_constant(kind):
    base = make_base(kind)
    layer = wrap(base, r=4, alpha=8)
    randomize(layer)
    x = x_for(layer)
    target = torch.randn(2, 3, layer.out_features, generator=torch.Generator().manual_seed(9))
    (layer(x) * target).sum().backward()
    leaves = [t.detach().clone().requires_grad_(True)
              for t in (layer.lora_magnitude_vector, layer.lora_A.weight, layer.lora_B.weight)]
    (paper_output(base, x, *leaves, 2.0) * target).sum().backward()
    ours = (layer.lora_magnitude_vector.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    for got, want in zip(ours, (t.grad for t in leaves), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # the check can tell: with the norm in the graph the A/B gradients differ
    m, A, B = (t.detach().clone().requires_grad_(True) for t in leaves)
    direction = w0_of(base).float() + 2.0 * B @ A
    y = x @ ((m / direction.norm(dim=1))[:, None] * direction).t()
    (y * target).sum().backward()
    assert not torch.allclose(B.grad, layer.lora_B.weight.grad, rtol=1e-3, atol=1e-4)


def test_dropout_only_on_the_lora_term():
    base = make_base("linear")
    layer = wrap(base, r=4, alpha=8, dropout=0.5)
    randomize(layer)
    layer.train()
    x = x_for(layer)
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    dropped = nn.functional.dropout(x, 0.5, training=True)  # the same mask: dropout is the only draw
    with torch.no_grad():
        A, B, m = layer.lora_A.weight, layer.lora_B.weight, layer.lora_magnitude_vector
        w0 = base.weight
        g = m / (w0 + 2.0 * B @ A).norm(dim=1)
        want = g * (x @ w0.t()) + g * (2.0 * dropped @ A.t() @ B.t()) + base.bias
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), paper_output(base, x, m, A, B, 2.0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Triton row norm


@pytest.mark.parametrize("out_f, in_f, r, transposed", [(48, 80, 4, False), (33, 70, 5, True), (17, 130, 20, False)])
def test_triton_row_norm_matches_torch(out_f, in_f, r, transposed, kernel_device):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(out_f)
    dev = kernel_device
    w0 = (torch.randn(in_f, out_f, generator=g).to(dev).t() if transposed
          else torch.randn(out_f, in_f, generator=g).to(dev))
    a = torch.randn(r, in_f, generator=g).to(dev)
    b = torch.randn(out_f, r, generator=g).to(dev)
    got = dora_row_norm_triton(w0, a, b, 0.7, block_out=16, block_in=32)
    torch.testing.assert_close(got, dora_row_norm_torch(w0, a, b, 0.7), rtol=1e-5, atol=1e-5)


def test_triton_row_norm_half_weight_and_bad_shapes(kernel_device):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(24, 40, generator=g).to(torch.float16).to(kernel_device)
    a, b = (t.to(kernel_device) for t in (torch.randn(3, 40, generator=g), torch.randn(24, 3, generator=g)))
    torch.testing.assert_close(dora_row_norm_triton(w0, a, b, 2.0), dora_row_norm_torch(w0, a, b, 2.0),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        dora_row_norm_triton(w0, a.t(), b, 2.0)


@pytest.mark.parametrize("kind", ["conv1d", "nf4"])
def test_forward_dispatches_to_the_kernel(kind, monkeypatch, kernel_device):
    """The torch path vs the kernel: forced on CPU (interpreter), the automatic dispatch on CUDA."""
    pytest.importorskip("triton")
    base = make_base(kind)
    layer = wrap(base, r=4, alpha=8)
    randomize(layer)
    layer.to(kernel_device)
    x = x_for(layer).to(kernel_device)
    monkeypatch.setenv("ADAPTERHUB_KERNELS", "torch")
    with torch.no_grad():
        expected = layer(x)
    monkeypatch.delenv("ADAPTERHUB_KERNELS")
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return dora_row_norm_triton(*args, **kwargs)

    if kernel_device.type == "cpu":
        monkeypatch.setattr(dora_mod, "use_triton", lambda *tensors: True)  # as on CUDA
    monkeypatch.setattr(dora_mod, "dora_row_norm_triton", counting)
    with torch.no_grad():
        got = layer(x)
    assert calls
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- PEFT equivalence


def _peft():
    return pytest.importorskip("peft")


PEFT_CASES = {
    "llama": ("tiny-llama", "attn.* -> dora(r=4, alpha=16)",
              {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}),
    "gpt2": ("tiny-gpt2", "attn.* -> dora(r=4, alpha=16)",
             {"target_modules": r".*attn\.c_(attn|proj)", "fan_in_fan_out": True}),  # PEFT: DoRA on Conv1D works
}


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapterhub.adapter_layers(model):
            for p in layer.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _compare_with_peft(ours, peft_base, peft_kwargs, tmp_path):
    peft = _peft()
    pm = peft.get_peft_model(peft_base, peft.LoraConfig(r=4, lora_alpha=16, use_dora=True, **peft_kwargs))
    adapterhub.save(ours, tmp_path / "b")
    state = load_file(str(tmp_path / "b" / "adapter_model.safetensors"))
    assert set(state) == set(peft.get_peft_model_state_dict(pm))  # same on-disk keys as PEFT
    assert any(k.endswith("_proj.lora_magnitude_vector") or k.endswith(".c_attn.lora_magnitude_vector")
               for k in state)
    result = peft.set_peft_model_state_dict(pm, state)
    assert not result.unexpected_keys
    ours.eval()
    pm.eval()
    ids = torch.randint(1, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits, pm(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    return pm


PEFT_QUIET = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")  # offline config lookups


@PEFT_QUIET
@pytest.mark.parametrize("fam", list(PEFT_CASES))
def test_same_outputs_as_peft_dora(fam, tmp_path):
    peft = _peft()
    name, spec, kwargs = PEFT_CASES[fam]
    base = build_builtin(name)
    ours = adapterhub.apply(copy.deepcopy(base), spec)
    fresh = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=16, use_dora=True, **kwargs))
    peft_m = {k: v for k, v in peft.get_peft_model_state_dict(fresh).items() if "magnitude" in k}
    ours_m = {f"base_model.model.{n}.lora_magnitude_vector": layer.lora_magnitude_vector
              for n, layer in adapterhub.adapter_layers(ours)}
    assert set(peft_m) == set(ours_m)
    for k, v in peft_m.items():  # both start m at ||W0||_row
        torch.testing.assert_close(ours_m[k].detach(), v, rtol=1e-6, atol=1e-7)
    _perturb(ours)
    _compare_with_peft(ours, copy.deepcopy(base), kwargs, tmp_path)


@PEFT_QUIET
def test_qdora_same_outputs_as_peft_on_the_dequantized_weights(tmp_path):
    _peft()
    base = build_builtin("tiny-llama")
    ours = adapterhub.apply(copy.deepcopy(base), "mlp.* -> dora(r=4, alpha=16) on nf4")
    _perturb(ours)
    dense = copy.deepcopy(base)
    with torch.no_grad():
        for name, layer in adapterhub.adapter_layers(ours):
            dense.get_submodule(name).weight.copy_(layer.base_layer.dequantize())
    _compare_with_peft(ours, dense, {"target_modules": ["gate_proj", "up_proj", "down_proj"]}, tmp_path)
