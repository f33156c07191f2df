"""GLoRA beyond the shared matrix: parameters, both torch forms and the Triton kernel of the
low-rank Hadamard matmul, gradients, supernet paths (sliced supports), merge with a created bias,
quantized and Conv1D bases, plan counts.

Expected values are computed here from the tensors with a dense ``W' = W0 + W0 ⊙ A + B``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins._glora_kernel import (
    hadamard_lowrank_matmul,
    hadamard_lowrank_matmul_torch,
)
from adapterhub.plugins.glora import GloraLayer, GloraParams, format_call
from adapterhub.registry import ApplyContext, ModuleTypeError, ParamError, bind, get_registry


def variant():
    return get_registry().variants["glora"]


def wrap(base: nn.Module, **params) -> GloraLayer:
    v = variant()
    return v.wrap(base, bind(v.Params, params, owner="glora"), ApplyContext(), "model.layer")


def randomize(layer: GloraLayer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.2)


def dense(w0, b0, sup: dict, x):
    """y from a dense W' and b' (sup: A/B out x in-broadcastable, C in x 1, D/E out-broadcastable)."""
    zero = torch.zeros(1, dtype=w0.dtype)
    w = w0 + w0 * sup.get("a", zero) + sup.get("b", zero)
    bias = sup.get("e", zero) + (w0 @ sup.get("c", torch.zeros(w0.shape[1], 1, dtype=w0.dtype)))[:, 0]
    if b0 is not None:
        bias = bias + b0 + b0 * sup.get("d", zero)
    return x @ w.t() + bias


# ----------------------------------------------------------------------------- parameters


def test_defaults_are_the_supernet_configuration():
    p = GloraParams()
    assert p.config() == {"a": "lora", "b": "lora", "c": "lora", "d": "vector", "e": "vector"} and p.r == 4
    assert format_call(p.config(), p.r) == "glora(a=lora, b=lora, c=lora, d=vector, e=vector, r=4)"


@pytest.mark.parametrize("args, name", [({"a": "matrix"}, "a"), ({"c": "scalar"}, "c"), ({"d": "lora"}, "d"),
                                        ({"r": 0}, "r"), ({"rank": 4}, "rank")])
def test_bad_parameters_name_the_parameter(args, name):
    with pytest.raises(ParamError) as exc:
        bind(GloraParams, args, owner="glora")
    assert exc.value.param == name


def test_bad_value_in_a_spec_is_a_located_error():
    with pytest.raises(adapterhub.SurgeryError, match="one of lora, vector, scalar, none"):
        adapterhub.plan("tiny-llama", "attn.* -> glora(a=vectr)")


def test_embedding_is_not_wrapped():
    with pytest.raises(ModuleTypeError, match="glora cannot wrap"):
        wrap(nn.Embedding(10, 4))


# ----------------------------------------------------------------------------- low-rank Hadamard matmul


def _operands(n, out_f, in_f, r, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, in_f, generator=g, dtype=dtype), torch.randn(out_f, in_f, generator=g, dtype=dtype),
            torch.randn(out_f, r, generator=g, dtype=dtype) * 0.3, torch.randn(r, in_f, generator=g, dtype=dtype))


@pytest.mark.parametrize("method", ["materialize", "rank", "auto"])
@pytest.mark.parametrize("n", [1, 7])
def test_torch_forms_are_exact(method, n):
    x, w, d, u = _operands(n, 13, 11, 3, dtype=torch.float64)
    want = x @ (w + w * (d @ u)).t()
    assert torch.allclose(hadamard_lowrank_matmul_torch(x, w, d, u, method), want, atol=1e-12)


def test_unknown_method_is_an_error():
    x, w, d, u = _operands(2, 3, 4, 1)
    with pytest.raises(ValueError, match="unknown method"):
        hadamard_lowrank_matmul_torch(x, w, d, u, "fast")


def test_gradients_match_dense_autograd():
    x, w, d, u = _operands(6, 9, 10, 2, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, d, u)]
    g = torch.randn(6, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (hadamard_lowrank_matmul(leaves[0], w, leaves[1], leaves[2]) * g).sum().backward()
    ref = [t.clone().requires_grad_() for t in (x, d, u)]
    ((ref[0] @ (w + w * (ref[1] @ ref[2])).t()) * g).sum().backward()
    for a, b in zip(leaves, ref):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


@pytest.mark.parametrize("n, out_f, in_f, r, transposed", [(5, 19, 23, 3, False), (1, 33, 17, 1, True),
                                                             (9, 40, 37, 4, True)])
def test_triton_kernel_matches_torch(n, out_f, in_f, r, transposed, kernel_device):
    pytest.importorskip("triton")
    from adapterhub.plugins._glora_kernel import hadamard_lowrank_matmul_triton

    x, w, d, u = (t.to(kernel_device) for t in _operands(n, out_f, in_f, r, seed=n))
    if transposed:  # GPT-2's Conv1D: W0 is a transposed view of an in x out weight
        w = w.t().contiguous().t()
    got = hadamard_lowrank_matmul_triton(x.reshape(1, n, in_f), w, d, u, block_m=16, block_n=16, block_k=16)
    want = hadamard_lowrank_matmul_torch(x, w, d, u, "materialize").reshape(1, n, out_f)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5)


def test_triton_kernel_checks_shapes(kernel_device):
    pytest.importorskip("triton")
    from adapterhub.plugins._glora_kernel import hadamard_lowrank_matmul_triton

    x, w, d, u = (t.to(kernel_device) for t in _operands(2, 5, 4, 2))
    with pytest.raises(ValueError, match="shapes do not fit"):
        hadamard_lowrank_matmul_triton(x, w, d[:3], u)


# ----------------------------------------------------------------------------- the layer


def _supports(layer, cfg=None):
    """Dense supports from the layer's tensors for a configuration (slices for smaller options)."""
    cfg = cfg or layer.config
    out = {}
    for s, opt in cfg.items():
        if opt == "none" or (s == "d" and not layer.has_bias):
            continue
        p = getattr(layer, f"glora_{s.upper()}")
        if opt == "lora":
            out[s] = p["Xd"] @ p["Xu"]
            continue
        t = p["Xd"] if "Xd" in p else p["X"]
        vec = t[:, :1] if t.dim() == 2 else t
        if s in "de":
            vec = vec.reshape(-1)
        out[s] = vec if opt == "vector" else vec.reshape(-1)[:1]
    return out


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cfg", [{}, {"a": "vector", "b": "scalar", "c": "vector", "d": "scalar", "e": "none"},
                                 {"a": "none", "b": "none", "c": "none", "d": "none", "e": "none"}])
def test_linear_forward_and_gradients(bias, cfg):
    torch.manual_seed(0)
    layer = wrap(nn.Linear(12, 10, bias=bias), **cfg)
    randomize(layer)
    x = torch.randn(2, 3, 12)
    base = layer.base_layer
    want = dense(base.weight, base.bias, _supports(layer), x)
    got = layer(x)
    assert torch.allclose(got, want, atol=1e-5)
    params = layer.trainable_parameters()
    if params:
        g = torch.randn_like(got)
        grads = torch.autograd.grad((got * g).sum(), params)
        grads_ref = torch.autograd.grad((want * g).sum(), params)
        for a, b in zip(grads, grads_ref):
            assert torch.allclose(a, b, atol=1e-4)


def test_no_bias_means_no_d_but_e_and_c_apply():
    layer = wrap(nn.Linear(8, 6, bias=False), d="vector", e="scalar", c="vector")
    assert not len(layer.glora_D) and layer.config["d"] == "none"
    randomize(layer)
    x = torch.randn(4, 8)
    base_out = layer.base_layer(x)
    e = layer.glora_E["X"]
    wc = layer.base_layer.weight @ layer.glora_C["X"]
    assert not torch.allclose(layer(x), base_out)
    a_b = dense(layer.base_layer.weight, None, {k: v for k, v in _supports(layer).items() if k in "ab"}, x)
    assert torch.allclose(layer(x), a_b + e + wc[:, 0], atol=1e-5)


def test_plan_count_equals_live_count_with_and_without_bias():
    for fam, spec in (("tiny-llama", "attn.* -> glora(d=scalar)"), ("tiny-bert", "attn.* -> glora(d=scalar)"),
                      ("tiny-gpt2", "attn.* -> glora(a=vector, c=lora, r=3)")):
        model = adapterhub.apply(build_builtin(fam), spec)
        live = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert adapterhub.plan(fam, spec).trainable == live > 0


def test_conv1d_delta_is_in_conv_layout_and_merges():
    torch.manual_seed(0)
    conv = Conv1D(nf=10, nx=7)
    with torch.no_grad():
        conv.bias.normal_()
    layer = wrap(conv, a="lora", b="vector", c="lora", d="vector", e="scalar", r=2)
    randomize(layer)
    x = torch.randn(3, 7)
    w0 = conv.weight.t()
    want = dense(w0, conv.bias, _supports(layer), x)
    assert torch.allclose(layer(x), want, atol=1e-5)
    assert layer.delta_weight().shape == conv.weight.shape
    before = conv.weight.detach().clone(), conv.bias.detach().clone()
    layer.merge()
    assert torch.allclose(layer(x), want, atol=1e-5)
    layer.unmerge()
    assert torch.equal(conv.weight, before[0]) and torch.equal(conv.bias, before[1])


def test_merge_makes_a_bias_and_unmerge_removes_it():
    base = nn.Linear(9, 5, bias=False)
    layer = wrap(base)
    randomize(layer)
    keys = set(base.state_dict())
    w_before = base.weight.detach().clone()
    x = torch.randn(2, 9)
    out = layer(x)
    layer.merge()
    assert base.bias is not None and not base.bias.requires_grad
    assert torch.allclose(layer(x), out, atol=1e-5)
    assert torch.allclose(base.bias, layer.delta_bias(), atol=1e-6)
    layer.unmerge()
    assert base.bias is None and set(base.state_dict()) == keys
    assert torch.equal(base.weight, w_before)
    assert torch.allclose(layer(x), out, atol=1e-6)


def test_merge_without_bias_terms_makes_no_bias():
    base = nn.Linear(6, 4, bias=False)
    layer = wrap(base, c="none", e="none")
    randomize(layer)
    assert layer.delta_bias() is None
    layer.merge()
    assert base.bias is None
    layer.unmerge()


def test_quantized_base_forward_merge_unmerge():
    torch.manual_seed(0)
    q = get_registry().quantizers["nf4"]
    qbase = q.quantize(nn.Linear(64, 32), q.Params())
    layer = wrap(qbase, b="vector", d="scalar")
    randomize(layer)
    x = torch.randn(2, 64)
    want = dense(qbase.dequantize(), qbase.bias, _supports(layer), x)
    assert torch.allclose(layer(x), want, atol=1e-4)
    layer.merge()
    assert torch.allclose(layer(x), want, atol=1e-4)
    layer.unmerge()
    assert layer.base_layer is qbase


def test_supernet_paths_are_slices_of_the_held_tensors():
    layer = wrap(nn.Linear(12, 10))
    randomize(layer)
    x = torch.randn(5, 12)
    cfg = {"a": "vector", "b": "scalar", "c": "vector", "d": "scalar", "e": "none"}
    layer.path = cfg
    assert torch.allclose(layer(x), dense(layer.base_layer.weight, layer.base_layer.bias, _supports(layer, cfg), x),
                          atol=1e-5)
    sliced = layer.support("a", "vector")
    assert sliced.data_ptr() == layer.glora_A["Xd"].data_ptr()  # shares storage: gradients reach Xd
    small = wrap(nn.Linear(12, 10), a="scalar")
    small.path = {"a": "lora", "b": "lora", "c": "lora", "d": "vector", "e": "vector"}
    with pytest.raises(ParamError, match="cannot act as 'lora'"):
        small(x)


def test_float64_and_bfloat16_bases():
    l64 = wrap(nn.Linear(6, 4, dtype=torch.float64))
    assert all(p.dtype == torch.float64 for p in l64.trainable_parameters())
    lb = wrap(nn.Linear(6, 4, dtype=torch.bfloat16))
    randomize(lb)
    y = lb(torch.randn(3, 6, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_layer_through_the_kernel_path(monkeypatch, kernel_device):
    """The layer's forward and backward with the Triton kernel (interpreted on CPU, forced there; the
    automatic dispatch on CUDA) equal the torch path."""
    pytest.importorskip("triton")
    import adapterhub.plugins._glora_kernel as kernel

    torch.manual_seed(0)
    layer = wrap(nn.Linear(19, 13), r=3)
    randomize(layer)
    layer.to(kernel_device)
    x = torch.randn(2, 5, 19).to(kernel_device)
    params = layer.trainable_parameters()
    monkeypatch.setenv("ADAPTERHUB_KERNELS", "torch")
    want = layer(x)
    grads_want = torch.autograd.grad(want.square().sum(), params)
    monkeypatch.delenv("ADAPTERHUB_KERNELS")
    if kernel_device.type == "cpu":
        monkeypatch.setattr(kernel, "use_triton", lambda *tensors: True)
    got = layer(x)
    grads_got = torch.autograd.grad(got.square().sum(), params)
    assert torch.allclose(got, want, atol=1e-5)
    for a, b in zip(grads_got, grads_want):
        assert torch.allclose(a, b, atol=1e-4)
