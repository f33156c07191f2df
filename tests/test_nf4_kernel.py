"""The fused 4-bit (QLoRA) kernel: in-register NF4/FP4 dequantization, its GEMM, LoRA epilogue and backward.

Under ``TRITON_INTERPRET=1`` on awkward widths (32 and 96, where bitsandbytes' own 2-D CPU decode goes
wrong; 72, 200; an odd element count). The dequantization is checked bit for bit against a decoder
written here from the format (codes high nibble first, double-quantized block scales) and against
``Bnb4bitLinear.dequantize``: multiplying the identity reads the decoded weight back exactly.
Products vs float64: fp32 2e-6 relative to the largest entry; bf16 2e-2. Under
``ADAPTERHUB_TEST_TRITON_GPU=1`` the modules are quantized on CPU (the same codes) and moved to CUDA
(``kernel_device``), where the kernel is compiled and layers reach it through the automatic dispatch.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from adapterhub.plugins import _nf4_kernel as nk  # noqa: E402
from adapterhub.plugins._bnb import NESTED_BLOCKSIZE  # noqa: E402
from adapterhub.plugins.fp4 import Fp4Linear  # noqa: E402
from adapterhub.plugins.lora import LoraLayer  # noqa: E402
from adapterhub.plugins.nf4 import Nf4Linear  # noqa: E402

from .test_lora_kernel import compare_paths, count_launches, perturbed, rel  # noqa: E402

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]  # QLoRA, arXiv 2305.14314, Appendix E


def decode(q) -> torch.Tensor:
    """``w[i] = NF4[code(i)] * absmax(i // blocksize)``, element 2k in the high nibble of byte k.

    Decoded on CPU from the module's buffers, returned on their device."""
    n = q.out_features * q.in_features
    b = q.qweight.cpu().reshape(-1).long()
    codes = torch.stack([b >> 4, b & 15], 1).reshape(-1)[:n]
    if q.double_quant:
        absmax, nested_map = q.absmax.cpu(), q.nested_quant_map.cpu()
        j = torch.arange(absmax.numel())
        scales = nested_map[absmax.long()] * q.nested_absmax.cpu()[j // NESTED_BLOCKSIZE] + q.nested_offset.cpu()
    else:
        scales = q.absmax.cpu().float()
    w = torch.tensor(NF4)[codes] * scales[torch.arange(n) // q.blocksize]
    return w.reshape(q.out_features, q.in_features).to(q.weight_dtype).to(q.qweight.device)


def nf4(out_f, in_f, dtype=torch.float32, bias=True, seed=0, cls=Nf4Linear, device="cpu", **kw):
    """A 4-bit module quantized on CPU (the same codes for every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    return cls(w, torch.randn(out_f, generator=g).to(dtype) if bias else None, **kw).to(device)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("in_f, out_f, blocksize", [(32, 5, 64), (96, 5, 64), (72, 7, 32), (200, 3, 64), (33, 3, 64)])
def test_fused_matmul_equals_dequantize_then_matmul(in_f, out_f, blocksize, double_quant, kernel_device):
    q = nf4(out_f, in_f, blocksize=blocksize, double_quant=double_quant, device=kernel_device)
    W = q.dequantize()
    torch.testing.assert_close(W, decode(q), rtol=0, atol=0)
    # the identity reads the decoded weight back bit for bit, in both orientations
    eye_in, eye_out = torch.eye(in_f, device=kernel_device), torch.eye(out_f, device=kernel_device)
    torch.testing.assert_close(nk.nf4_lora_gemm(eye_in, q).t(), W, rtol=0, atol=0)
    torch.testing.assert_close(nk.nf4_lora_gemm(eye_out, q, transpose=True), W, rtol=0, atol=0)
    g = torch.Generator().manual_seed(1)
    x, gy = (t.to(kernel_device) for t in (torch.randn(9, in_f, generator=g), torch.randn(9, out_f, generator=g)))
    assert rel(nk.nf4_lora_gemm(x, q, bias=q.bias), x.double() @ W.double().t() + q.bias.double()) < 2e-6
    assert rel(nk.nf4_lora_gemm(gy, q, transpose=True), gy.double() @ W.double()) < 2e-6


@pytest.mark.parametrize("cls, dtype", [(Nf4Linear, torch.bfloat16), (Nf4Linear, torch.float16),
                                        (Fp4Linear, torch.bfloat16)])
def test_16bit_weights_round_exactly_like_dequantize(cls, dtype, kernel_device):
    q = nf4(5, 96, dtype, cls=cls, double_quant=True, device=kernel_device)
    W = q.dequantize()
    assert W.dtype == dtype
    eye_in, eye_out = (torch.eye(n, dtype=dtype, device=kernel_device) for n in (96, 5))
    torch.testing.assert_close(nk.nf4_lora_gemm(eye_in, q).t(), W, rtol=0, atol=0)
    torch.testing.assert_close(nk.nf4_lora_gemm(eye_out, q, transpose=True), W, rtol=0, atol=0)


@pytest.fixture
def launches(monkeypatch):
    return count_launches(monkeypatch)


def layer_on(q, r=3, seed=2) -> LoraLayer:
    return perturbed(LoraLayer(q, r=r, alpha=6.0), seed)


def run(layer, x, g):
    layer.zero_grad()
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y.float() * g.to(y.device)).sum().backward()
    return y.detach(), x.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()


@pytest.mark.parametrize("wdtype, xdtype, compute, tol", [
    (torch.float32, torch.float32, None, 2e-6),
    (torch.bfloat16, torch.bfloat16, None, 2e-2),
    (torch.bfloat16, torch.bfloat16, torch.float32, 2e-2),
])
def test_qlora_layer_forward_and_grads_equal_torch_path(monkeypatch, launches, wdtype, xdtype, compute, tol,
                                                        kernel_device, kernel_env):
    q = nf4(40, 72, wdtype, blocksize=32, double_quant=True, compute_dtype=compute, device=kernel_device)
    layer = layer_on(q)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 7, 72, generator=gen).to(xdtype).to(kernel_device)
    g = torch.randn(2, 7, 40, generator=gen).to(kernel_device)
    monkeypatch.setenv("ADAPTERHUB_KERNELS", "torch")
    want = run(layer, x, g)
    monkeypatch.setenv("ADAPTERHUB_KERNELS", kernel_env)
    got = run(layer, x, g)
    assert launches == ["nf4_lora_gemm", "nf4_lora_gemm"]  # forward; dx
    for name, a, b in zip(("y", "x", "A", "B"), got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert rel(a, b) < tol, name


def test_backward_never_builds_the_dense_weight(monkeypatch, kernel_device, kernel_env):
    """Neither pass calls ``dequantize``; saved for backward: x, xa and the adapter tensors only."""
    q = nf4(24, 33, double_quant=False, device=kernel_device)
    layer = layer_on(q, r=2)
    monkeypatch.setenv("ADAPTERHUB_KERNELS", "torch")
    x = torch.randn(5, 33, generator=torch.Generator().manual_seed(4)).to(kernel_device)
    want = run(layer, x, torch.ones(5, 24))
    monkeypatch.setenv("ADAPTERHUB_KERNELS", kernel_env)

    def refuse():
        raise AssertionError("the fused path dequantized the whole weight")

    monkeypatch.setattr(q, "dequantize", refuse)
    saved = []
    layer.zero_grad()
    x_req = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = layer(x_req)
    assert sorted(saved) == sorted([(5, 33), (5, 2), (2, 33), (24, 2)])
    y.sum().backward()
    got = (y.detach(), x_req.grad, layer.lora_A.weight.grad, layer.lora_B.weight.grad)
    for a, b in zip(got, want):
        assert rel(a, b) < 2e-6


def test_applied_qlora_model_same_logits_and_grads(monkeypatch, launches, kernel_device, kernel_env):
    compare_paths("attn.* -> lora(r=4) on nf4", monkeypatch, launches, 1e-5, kernel_device, kernel_env)
    assert set(launches) == {"nf4_lora_gemm"}
