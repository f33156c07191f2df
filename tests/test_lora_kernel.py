"""The fused LoRA linear kernels (forward, backward) and their dispatch from ``LoraLayer``.

Kernels run on CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py) on small shapes that are not
multiples of the 16-wide interpreter tiles. Expected values come from the formula in float64
``y = x W^T + b + s (x A^T) B^T`` and its hand-derived gradients, and from the layer's torch path.
Tolerances, relative to the largest reference entry: fp32 2e-6; fp16 4e-3; bf16 2e-2 (the
kernel rounds once, the torch path two or three times, each bf16 rounding up to 2^-9).
Under ``ADAPTERHUB_TEST_TRITON_GPU=1`` the same tests run compiled on CUDA tensors (``kernel_device``),
layers through the automatic dispatch (``kernel_env``); the tolerances are the same there (fp32 dots are
IEEE in both the kernels and torch unless TF32 is switched on; 16-bit products are exact in fp32).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("triton")

import adapterhub  # noqa: E402
from adapterhub.models import build_builtin  # noqa: E402
from adapterhub.plugins import _lora_kernel as lk  # noqa: E402
from adapterhub.plugins import _tile_tuning as tiles  # noqa: E402
from adapterhub.plugins.lora import LoraLayer  # noqa: E402
from adapterhub.registry import AdapterhubError  # noqa: E402

TOL = {torch.float32: 2e-6, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest error relative to the largest reference entry, in float64 on CPU (any devices)."""
    a, ref = a.detach().cpu().double(), ref.detach().cpu().double()
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def operands(m, k, n, r, dtype, bias=True, seed=0, device="cpu"):
    """Random operands drawn on CPU (the same values on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    W = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    A = torch.randn(r, k, generator=g) / k ** 0.5
    B = torch.randn(n, r, generator=g)
    return tuple(t.to(device) if t is not None else None for t in (x, W, b, A, B))


def formula(x, W, b, A, B, s, g):
    """float64: y and the gradients of sum(y * g) for x, b, A, B, derived by hand."""
    x, W, A, B, g = (t.double() for t in (x, W, A, B, g))
    xa = x @ A.t()
    y = x @ W.t() + s * xa @ B.t() + (b.double() if b is not None else 0)
    gB = g @ B
    return y, {"x": g @ W + s * gB @ A, "b": g.sum(0), "A": s * gB.t() @ x, "B": s * g.t() @ xa}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m, k, n, r, bias", [(19, 37, 24, 5, True), (3, 17, 20, 1, False), (5, 20, 18, 128, True)])
def test_forward_and_gradients_match_formula(dtype, m, k, n, r, bias, kernel_device):
    x, W, b, A, B = operands(m, k, n, r, dtype, bias, device=kernel_device)
    leaves = {"x": x.requires_grad_(), "A": A.requires_grad_(), "B": B.requires_grad_()}
    if b is not None:
        leaves["b"] = b.requires_grad_()
    s = 0.75
    y = lk.lora_linear(x, W, b, A, B, s)
    assert y.dtype == dtype and y.shape == (m, n)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(1)).to(dtype).to(kernel_device)
    (y * g).sum().backward()
    want_y, want = formula(x.detach(), W, b, A.detach(), B.detach(), s, g)
    assert rel(y, want_y) < TOL[dtype]
    for name, leaf in leaves.items():
        assert leaf.grad.dtype == leaf.dtype, name
        assert rel(leaf.grad, want[name]) < TOL[dtype], name
    assert not W.requires_grad and W.grad is None


def test_strided_inputs_and_leading_dims(kernel_device):
    x, W, b, A, B = operands(12, 21, 19, 6, torch.float32, device=kernel_device)
    x3 = x.reshape(3, 4, 21).transpose(0, 1)  # non-contiguous, 3-D
    W_t = W.t().contiguous().t()  # column-major weight
    B_wide = torch.stack([B, -B], 2).reshape(19, 12)[:, ::2]  # B itself, with strided columns
    y = lk.lora_linear(x3, W_t, b, A, B_wide, 2.0)
    assert y.shape == (4, 3, 19)
    want, _ = formula(x3.reshape(-1, 21), W, b, A, B, 2.0, torch.zeros(12, 19, device=kernel_device))
    assert rel(y.reshape(-1, 19), want) < TOL[torch.float32]


def test_shrink_and_gemm_building_blocks(kernel_device):
    g = torch.Generator().manual_seed(3)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(kernel_device)

    x, p = randn(23, 40).half(), randn(40, 70)
    got = lk.shrink(x, p, 0.5)
    assert got.dtype == torch.float32 and rel(got, 0.5 * x.double() @ p.double()) < 1e-6
    long_x, long_p = randn(20, 150), randn(150, 3)
    # CPU: the inner 150 is cut into 4 slices, summed after; CUDA: min(2 programs per SM, 10 steps // 4)
    assert lk.shrink_splits(2, 10, long_x) == (4 if kernel_device.type == "cpu" else 2)
    assert rel(lk.shrink(long_x, long_p, 2.0), 2.0 * long_x.double() @ long_p.double()) < 1e-6
    w = randn(40, 33).half()
    low, up = randn(23, 3), randn(3, 33)
    out = lk.lora_gemm(x, w, None, low, up, -1.5, torch.float32)
    assert rel(out, x.double() @ w.double() - 1.5 * low.double() @ up.double()) < 1e-6


def test_backward_saves_only_x_and_xa(kernel_device):
    """Nothing of shape M x N (x W^T, y) is kept for backward: only x, xa (M x r) and the parameters."""
    m, k, n, r = 9, 22, 31, 3
    x, W, b, A, B = operands(m, k, n, r, torch.float32, device=kernel_device)
    x.requires_grad_()
    A.requires_grad_()
    B.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lk.lora_linear(x, W, b, A, B, 1.0)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(m, k), (m, r), (n, k), (r, k), (n, r)])
    assert {t.data_ptr() for t in saved} >= {x.data_ptr(), W.data_ptr(), A.data_ptr(), B.data_ptr()}
    y.sum().backward()
    assert W.grad is None and x.grad is not None


def test_trainable_base_weight_is_refused(kernel_device):
    x, W, b, A, B = operands(4, 16, 16, 2, torch.float32, device=kernel_device)
    W.requires_grad_()
    with pytest.raises(RuntimeError, match="frozen"):
        lk.lora_linear(x, W, b, A, B, 1.0).sum().backward()


# --------------------------------------------------------------------------- dispatch


def count_launches(monkeypatch) -> list[str]:
    """Count fused GEMM launches (both the dense and the 4-bit kernel) by name."""
    from adapterhub.plugins import _nf4_kernel as nk

    calls = []
    for mod, name in ((lk, "lora_gemm"), (nk, "nf4_lora_gemm")):
        real = getattr(mod, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, counting)
    return calls


@pytest.fixture
def launches(monkeypatch):
    return count_launches(monkeypatch)


def perturbed(model: nn.Module, seed: int = 4) -> nn.Module:
    """Give every adapter tensor a non-zero value (B starts at 0, which would hide the low-rank path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g).to(p.device) * 0.2)
    return model


def logits_and_grads(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(ids).logits
    logits.square().mean().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


def compare_paths(spec: str, monkeypatch, launches, tol: float, device: torch.device | str = "cpu",
                  kernel_env: str = "triton", model: str = "tiny-llama", no_dx: int = 3) -> None:
    """Logits and every adapter gradient, torch path vs fused path (``ADAPTERHUB_KERNELS=kernel_env``:
    ``triton`` forces it on CPU, ``auto`` takes it on CUDA), on a built-in model on ``device``. ``no_dx``:
    the adapted layers whose input needs no gradient (they read the frozen embedding's output)."""
    monkeypatch.setattr(tiles, "INTERPRET_TILE", 64)  # the interpreter's cost is per program; edges are tested above
    model = perturbed(adapterhub.apply(build_builtin(model), spec)).to(device)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(5)).to(device)
    monkeypatch.setenv("ADAPTERHUB_KERNELS", "torch")
    want_logits, want_grads = logits_and_grads(model, ids)
    assert launches == []
    monkeypatch.setenv("ADAPTERHUB_KERNELS", kernel_env)
    got_logits, got_grads = logits_and_grads(model, ids)
    n_layers = len(list(adapterhub.adapter_layers(model)))
    # one fused forward per layer and one fused dx per layer but those reading the embedding's output
    assert len(launches) == 2 * n_layers - no_dx
    assert rel(got_logits, want_logits) < tol
    assert len(got_grads) == len(want_grads) == 2 * n_layers
    for a, b in zip(got_grads, want_grads):
        assert rel(a, b) < tol


def test_applied_model_same_logits_and_grads(monkeypatch, launches, kernel_device, kernel_env):
    compare_paths("attn.* -> lora(r=4)", monkeypatch, launches, 1e-5, kernel_device, kernel_env)
    assert set(launches) == {"lora_gemm"}


def test_gpt2_conv1d_bases_take_the_fused_path(monkeypatch, launches, kernel_device, kernel_env):
    """GPT-2's Conv1D holds W^T; the kernel reads it through strides (no copy), forward and backward."""
    compare_paths("c_attn -> lora(r=3)\nc_fc -> lora(r=2)", monkeypatch, launches, 1e-5, kernel_device,
                  kernel_env, model="tiny-gpt2", no_dx=1)
    assert set(launches) == {"lora_gemm"}


def test_mode_torch_auto_on_cpu_and_bad_value(monkeypatch, launches):
    model = perturbed(adapterhub.apply(build_builtin("tiny-llama"), "q_proj -> lora(r=2)"))
    ids = torch.randint(0, 256, (1, 4))
    for mode in ("torch", "auto"):
        monkeypatch.setenv("ADAPTERHUB_KERNELS", mode)
        model(ids)
    assert launches == []  # auto: CPU tensors stay on the torch path
    monkeypatch.setenv("ADAPTERHUB_KERNELS", "cuda")
    with pytest.raises(AdapterhubError, match="ADAPTERHUB_KERNELS='cuda' is not one of: auto, torch, triton"):
        model(ids)


def test_dropout_in_training_and_fp64_stay_on_torch(monkeypatch, launches, kernel_device, kernel_env):
    monkeypatch.setenv("ADAPTERHUB_KERNELS", kernel_env)
    lin = nn.Linear(20, 18)
    layer = perturbed(LoraLayer(lin, r=3, dropout=0.5)).to(kernel_device)
    x = torch.randn(5, 20).to(kernel_device)
    layer.train()
    layer(x)
    assert launches == []
    layer.eval()
    with torch.no_grad():
        got = layer(x)
    assert launches == ["lora_gemm"]
    monkeypatch.setenv("ADAPTERHUB_KERNELS", "torch")
    with torch.no_grad():
        assert rel(got, layer(x)) < 1e-6
    monkeypatch.setenv("ADAPTERHUB_KERNELS", kernel_env)
    lin64 = LoraLayer(nn.Linear(8, 8).double(), r=2).to(kernel_device)
    lin64(torch.randn(2, 8, dtype=torch.float64).to(kernel_device))
    assert launches == ["lora_gemm"]  # fp64 is not a kernel dtype


def test_adapterhub_imports_and_runs_without_triton():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import os, torch, adapterhub\n"
        "from adapterhub.plugins import _lora_kernel, _nf4_kernel\n"
        "from adapterhub.plugins.lora import LoraLayer\n"
        "from adapterhub.registry import AdapterhubError\n"
        "assert _lora_kernel.triton is None and _nf4_kernel.triton is None\n"
        "layer = LoraLayer(torch.nn.Linear(8, 6), r=2)\n"
        "layer(torch.randn(3, 8)).sum().backward()\n"
        "os.environ['ADAPTERHUB_KERNELS'] = 'triton'\n"
        "try:\n"
        "    layer(torch.randn(3, 8))\n"
        "except AdapterhubError as e:\n"
        "    print(e)\n")
    env = {"ADAPTERHUB_KERNELS": "auto", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the fused LoRA kernels need triton" in done.stdout


def test_bench_fn_times_both_paths(kernel_device):
    got = lk.bench_fn((4, 16, 16, 2), dtype=torch.float32, device=kernel_device.type)
    assert set(got) == {"fused_ms", "torch_ms", "ratio"}
    assert got["fused_ms"] > 0 and got["torch_ms"] > 0
    assert got["ratio"] == pytest.approx(got["fused_ms"] / got["torch_ms"])
