"""The shared Tied-LoRA/VeRA kernel (``s * v ⊙ (B (u ⊙ x_a))``) against its torch reference.

The kernel runs on CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py) on small, non-power-of-2
shapes. Expected values are written here from the formula, not taken from the module.
Under ``ADAPTERHUB_TEST_TRITON_GPU=1`` the tensors live on CUDA (``kernel_device``) and the layers
reach the kernel through the automatic dispatch; the tolerances are the same (IEEE fp32 dots).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import adapterhub  # noqa: E402
from adapterhub.models import build_builtin  # noqa: E402
from adapterhub.plugins import _scaled_lowrank as sl  # noqa: E402

N, R, OUT = 7, 5, 33


def tensors(n=N, r=R, out=OUT, dtype=torch.float32, seed=0, device="cpu"):
    """x_a, B, u, v drawn on CPU (the same values on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    return tuple(t.to(device) for t in (
        torch.randn(n, r, generator=g, dtype=dtype), torch.randn(out, r, generator=g, dtype=dtype),
        torch.randn(r, generator=g, dtype=dtype), torch.randn(out, generator=g, dtype=dtype)))


def formula(x_a, B, u, v, s):
    """Row by row: y[n, j] = s * v[j] * sum_k B[j, k] * u[k] * x_a[n, k] (float64)."""
    x_a, B, u, v = (t.double() for t in (x_a, B, u, v))
    return s * v[None, :] * torch.einsum("jk,k,nk->nj", B, u, x_a)


@pytest.mark.parametrize("n, r, out", [(N, R, OUT), (1, 1, 1), (19, 40, 70)])
def test_kernel_matches_formula(n, r, out, kernel_device):
    x_a, B, u, v = tensors(n, r, out, device=kernel_device)
    got = sl.scaled_lowrank(x_a, B, u, v, 0.7)
    assert got.shape == (n, out) and got.dtype == torch.float32
    assert torch.allclose(got.double(), formula(x_a, B, u, v, 0.7), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got, sl.scaled_lowrank_torch(x_a, B, u, v, 0.7), atol=1e-5, rtol=1e-5)


def test_kernel_adds_into_out_in_place(kernel_device):
    x_a, B, u, v = tensors(device=kernel_device)
    base = torch.randn(N, OUT, generator=torch.Generator().manual_seed(9)).to(kernel_device)
    out = base.clone()
    ret = sl.scaled_lowrank(x_a, B, u, v, 2.0, out=out)
    assert ret is out
    assert torch.allclose(out.double(), base.double() + formula(x_a, B, u, v, 2.0), atol=1e-5)


def test_kernel_strided_inputs_and_half_output(kernel_device):
    x_a, B, u, v = tensors(device=kernel_device)
    wide = torch.randn(OUT + 4, 2 * R, generator=torch.Generator().manual_seed(3)).to(kernel_device)
    B_strided = wide[:OUT, ::2]  # non-contiguous rows and columns
    x_t = x_a.t().contiguous().t()  # column-major
    got = sl.scaled_lowrank(x_t, B_strided, u, v, 1.0)
    assert torch.allclose(got.double(), formula(x_a, B_strided, u, v, 1.0), atol=1e-5)
    base = torch.randn(N, OUT, generator=torch.Generator().manual_seed(4)).half().to(kernel_device)
    out = base.clone()
    sl.scaled_lowrank(x_a, B, u, v, 0.5, out=out)
    want = (base.double() + formula(x_a, B, u, v, 0.5)).half()
    assert torch.allclose(out.float(), want.float(), atol=2e-2, rtol=2e-3)


def test_kernel_rejects_bad_shapes_and_dtypes(kernel_device):
    x_a, B, u, v = tensors(device=kernel_device)
    with pytest.raises(ValueError, match="shapes do not fit"):
        sl.scaled_lowrank(x_a, B, v, v, 1.0)
    with pytest.raises(ValueError, match="out must have shape"):
        sl.scaled_lowrank(x_a, B, u, v, 1.0, out=torch.zeros(N, OUT + 1, device=kernel_device))
    with pytest.raises(ValueError, match="dtype"):
        sl.scaled_lowrank(x_a.double(), B.double(), u.double(), v.double(), 1.0)


def test_autograd_function_gradients_equal_torch_path(kernel_device):
    leaves = [t.requires_grad_() for t in tensors(seed=1, device=kernel_device)]
    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    upstream = torch.randn(N, OUT, generator=torch.Generator().manual_seed(2)).to(kernel_device)
    got = sl.ScaledLowRank.apply(*leaves, 0.3)
    want = sl.scaled_lowrank_torch(*ref_leaves, 0.3)
    assert torch.allclose(got, want, atol=1e-5)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    for name, a, b in zip(("x_a", "B", "u", "v"), leaves, ref_leaves):
        assert torch.allclose(a.grad, b.grad, atol=1e-5, rtol=1e-5), name


def test_autograd_function_partial_grads(kernel_device):
    x_a, B, u, v = tensors(seed=5, device=kernel_device)
    v.requires_grad_()
    (sl.ScaledLowRank.apply(x_a, B, u, v, 1.5) ** 2).sum().backward()
    v2 = v.detach().clone().requires_grad_()
    (sl.scaled_lowrank_torch(x_a, B, u, v2, 1.5) ** 2).sum().backward()
    assert torch.allclose(v.grad, v2.grad, atol=1e-4, rtol=1e-5)


@pytest.fixture
def kernel_launches(monkeypatch, kernel_device):
    """Count kernel launches; on CPU also make the layers dispatch to the (interpreted) kernel, which
    they do by themselves for CUDA tensors."""
    calls = []
    real = sl.scaled_lowrank

    def counting(*args, **kwargs):
        calls.append(kwargs.get("out") is not None)
        return real(*args, **kwargs)

    if kernel_device.type == "cpu":
        monkeypatch.setattr(sl, "use_triton", lambda *tensors: True)
    monkeypatch.setattr(sl, "scaled_lowrank", counting)
    return calls


SPECS = {"tied_lora": "self_attn.q_proj -> tied_lora(r=5, alpha=10)",
         "vera": "layers.0.self_attn.{q,k}_proj -> vera(r=5)"}


@pytest.mark.parametrize("variant", sorted(SPECS))
def test_layer_forward_through_kernel_equals_torch(variant, kernel_launches, kernel_device):
    model = adapterhub.apply(build_builtin("tiny-llama"), SPECS[variant]).to(kernel_device)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, layer in adapterhub.adapter_layers(model):
            for p in layer.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g).to(kernel_device) * 0.1)
    name, layer = next(iter(adapterhub.adapter_layers(model)))
    x = torch.randn(3, 7, layer.in_features, generator=g).to(kernel_device)
    with torch.no_grad():
        fused = layer(x)  # in place into the base output
    assert kernel_launches == [True]
    sl_use = sl.use_triton
    sl.use_triton = lambda *t: False
    try:
        with torch.no_grad():
            plain = layer(x)
        x_req = x.clone().requires_grad_()
        ref = layer(x_req)
        ref.square().sum().backward()
        ref_grads = [p.grad.clone() for p in layer.trainable_parameters()] + [x_req.grad.clone()]
    finally:
        sl.use_triton = sl_use
    assert torch.allclose(fused, plain, atol=1e-5), f"{name}: {(fused - plain).abs().max():.2e}"
    layer.zero_grad()
    x_req = x.clone().requires_grad_()
    got = layer(x_req)  # through the autograd function
    assert kernel_launches == [True, False]
    assert torch.allclose(got, plain, atol=1e-5)
    got.square().sum().backward()
    grads = [p.grad for p in layer.trainable_parameters()] + [x_req.grad]
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
