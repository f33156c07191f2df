"""GLoRA's low-rank Hadamard matmul ``y = x (W0 + W0 ⊙ (Xd Xu))^T`` without storing ``W0 ⊙ (Xd Xu)``.

GLoRA's ``A`` support of type ``lora`` (``Xd``: ``out x r``, ``Xu``: ``r x in``) scales the base weight
element-wise, so the adapted weight ``W0 + W0 ⊙ (Xd Xu)`` is full-rank and has no cheap low-rank
side path the way LoRA's ``B A`` has. Three exact ways to compute ``y`` for ``x``: ``N x in``:

* ``materialize``: build ``W0 + W0 ⊙ (Xd Xu)`` (``out x in``, transient) and run one GEMM --
  ``(r + 2) out in + N out in`` flops;
* ``rank``: ``y = x W0^T + sum_k Xd[:, k] ⊙ (W0 (Xu[k, :] ⊙ x))`` -- ``(r + 1) N out in`` flops, no
  ``out x in`` buffer; cheaper only when ``N (r - 1) < r + 1`` (single-token decode, or ``r = 1``);
* the Triton kernel (CUDA): every ``BLOCK_N x BLOCK_K`` tile of ``W0 + W0 ⊙ (Xd Xu)`` is built in
  registers from the ``W0`` tile and ``r`` outer products, then fed to ``tl.dot``: one GEMM's
  memory traffic, the ``out x in`` matrix is never written.

:func:`hadamard_lowrank_matmul` is the autograd entry: its forward picks the kernel on CUDA (else
the cheaper torch form) and saves only ``x``, ``W0``, ``Xd``, ``Xu`` for backward; the backward
builds ``W0 ⊙ (1 + Xd Xu)`` once, transiently, and gives exact gradients for ``x``, ``Xd``, ``Xu``
(``W0`` is frozen: it gets none). ``W0`` may be any strided ``out x in`` view (GPT-2's Conv1D
weight transposed), which the kernel reads through its strides without a copy.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ._triton import use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _hadamard_lowrank_matmul_kernel(
            x_ptr, w_ptr, d_ptr, u_ptr, y_ptr, M, N, K,
            stride_xm, stride_xk, stride_wn, stride_wk, stride_dn, stride_dr, stride_ur, stride_uk,
            stride_ym, stride_yn,
            R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            IEEE: tl.constexpr):
        """One ``BLOCK_M x BLOCK_N`` tile of ``y = x (W0 + W0 ⊙ (D U))^T``, accumulated in fp32."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_ok = rm < M
        n_ok = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :] * stride_xk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + rn[:, None] * stride_wn + kk[None, :] * stride_wk,
                        mask=n_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            p = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for r in tl.static_range(R):  # (D U) tile as r outer products: r is small
                d = tl.load(d_ptr + rn * stride_dn + r * stride_dr, mask=n_ok, other=0.0).to(tl.float32)
                u = tl.load(u_ptr + r * stride_ur + kk * stride_uk, mask=k_ok, other=0.0).to(tl.float32)
                p += d[:, None] * u[None, :]
            w_eff = (w + w * p).to(x.dtype)
            if IEEE:
                acc += tl.dot(x, tl.trans(w_eff), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w_eff))
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def hadamard_lowrank_matmul_triton(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, u: torch.Tensor, *,
                                   block_m: int = 32, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    """``x (w + w ⊙ (d u))^T`` by the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``).

    ``x``: ``... x in``; ``w``: ``out x in`` (any strides); ``d``: ``out x r``; ``u``: ``r x in``.
    The result has ``x``'s dtype; fp32 inputs are multiplied in IEEE fp32 (no TF32).
    """
    if triton is None:
        raise RuntimeError("glora's fused kernel needs triton (pip install triton)")
    out_f, in_f = w.shape
    if x.shape[-1] != in_f or d.shape != (out_f, u.shape[0]) or u.shape[1] != in_f:
        raise ValueError(f"glora kernel: shapes do not fit: x {tuple(x.shape)}, W0 {tuple(w.shape)}, "
                         f"Xd {tuple(d.shape)}, Xu {tuple(u.shape)}")
    x2 = _flat(x)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, out_f, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(out_f, block_n))
    _hadamard_lowrank_matmul_kernel[grid](
        x2, w, d, u, y, m, out_f, in_f,
        x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), d.stride(0), d.stride(1), u.stride(0), u.stride(1),
        y.stride(0), y.stride(1),
        R=d.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32)
    return y.reshape(*x.shape[:-1], out_f)


def effective_weight(w: torch.Tensor, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``w + w ⊙ (d u)`` in fp32 (or fp64), ``out x in``."""
    dt = torch.promote_types(d.dtype, torch.float32)
    wf = w.to(dt)
    return wf + wf * (d.to(dt) @ u.to(dt))


def hadamard_lowrank_matmul_torch(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, u: torch.Tensor,
                                  method: str = "auto") -> torch.Tensor:
    """``x (w + w ⊙ (d u))^T`` in torch, by ``materialize``, ``rank`` or ``auto`` (fewer flops)."""
    n_tokens = x.numel() // max(x.shape[-1], 1)
    r = d.shape[1]
    if method == "auto":
        method = "rank" if n_tokens * (r - 1) < r + 1 else "materialize"
    if method == "materialize":
        return F.linear(x, effective_weight(w, d, u).to(x.dtype))
    if method != "rank":
        raise ValueError(f"unknown method {method!r} (materialize, rank, auto)")
    wx = w.to(x.dtype)
    y = F.linear(x, wx)
    for k in range(r):
        y = y + d[:, k].to(x.dtype) * F.linear(x * u[k].to(x.dtype), wx)
    return y


class _HadamardLowRankMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, d, u)
        if use_triton(x, w, d, u):
            return hadamard_lowrank_matmul_triton(x, w, d, u)
        return hadamard_lowrank_matmul_torch(x, w, d, u)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w, d, u = ctx.saved_tensors
        gx = gd = gu = None
        if ctx.needs_input_grad[0]:
            gx = grad @ effective_weight(w, d, u).to(grad.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dt = d.dtype
            gm = _flat(grad).to(dt).t() @ _flat(x).to(dt)  # dL/dW_eff: out x in (transient)
            gp = gm * w.to(dt)  # dL/d(D U)
            gd = gp @ u.t() if ctx.needs_input_grad[2] else None
            gu = d.t() @ gp if ctx.needs_input_grad[3] else None
        return gx, None, gd, gu


def hadamard_lowrank_matmul(x: torch.Tensor, w: torch.Tensor, d: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x (w + w ⊙ (d u))^T`` with autograd for ``x``, ``d``, ``u`` (``w`` is the frozen base)."""
    return _HadamardLowRankMatmul.apply(x, w, d, u)
