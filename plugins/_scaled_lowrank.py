"""The scaled low-rank update shared by ``tied_lora`` and ``vera``, in torch and as a Triton kernel.

Both variants add, for an input already projected by the (shared) down-projection ``A``,

    update = s * v ⊙ (B (u ⊙ x_a)),      x_a = A x ∈ ℝ^{N×r},  B ∈ ℝ^{out×r},  u ∈ ℝ^r,  v ∈ ℝ^{out}

(Tied-LoRA: ``u``, ``v`` are the per-layer scaling vectors and ``s = alpha / r``; VeRA: ``u = d``,
``v = b``, ``s = 1``). Written in torch this is four kernels and three ``N x out`` round trips
(``u ⊙ x_a``, the GEMM, the ``v``/``s`` scaling, the add into the base output). The Triton kernel
:func:`scaled_lowrank` does it in one: it scales ``x_a`` by ``u`` while loading it, runs the
``N x r x out`` GEMM in fp32, scales the tile by ``s·v`` in registers and writes it -- or adds it
into the base layer's output in place (``out=``).

The kernel is forward-only. :class:`ScaledLowRank` wraps it in an autograd function whose backward
is plain torch; :func:`add_scaled_lowrank` is what the layers call: the kernel on CUDA
(:func:`adapterhub.plugins._triton.use_triton`), in place when no gradient is needed, and the
torch reference :func:`scaled_lowrank_torch` everywhere else.
"""

from __future__ import annotations

from typing import Any

import torch

from ._triton import block, use_triton
from .lora import adapter_factory  # noqa: F401  (re-exported for tied_lora, vera)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

#: dtypes the kernel takes (it accumulates in fp32; fp64 stays on the torch path)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def scaled_lowrank_torch(x_a: torch.Tensor, B: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                         s: float) -> torch.Tensor:
    """The reference: ``s * v ⊙ (B (u ⊙ x_a))`` row-wise, i.e. ``((x_a * u) @ B^T) * (s * v)``."""
    return ((x_a * u) @ B.t()) * (v * s)


if triton is not None:

    @triton.jit
    def _scaled_lowrank_kernel(xa_ptr, b_ptr, u_ptr, v_ptr, out_ptr, N, R, OUT, s,
                               stride_xn, stride_xr, stride_bo, stride_br, stride_on, stride_oo,
                               ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
        """One ``BLOCK_N x BLOCK_O`` tile of ``out (+)= s * v ⊙ ((x_a ⊙ u) B^T)``."""
        pid_n = tl.program_id(0)
        pid_o = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_n = offs_n < N
        mask_o = offs_o < OUT
        acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
        for k0 in range(0, R, BLOCK_R):
            offs_r = k0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            xa = tl.load(xa_ptr + offs_n[:, None] * stride_xn + offs_r[None, :] * stride_xr,
                         mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            u = tl.load(u_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)
            bt = tl.load(b_ptr + offs_o[None, :] * stride_bo + offs_r[:, None] * stride_br,
                         mask=mask_r[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(xa * u[None, :], bt, acc, input_precision=PRECISION)
        v = tl.load(v_ptr + offs_o, mask=mask_o, other=0.0).to(tl.float32)
        acc = acc * (v * s)[None, :]
        out_ptrs = out_ptr + offs_n[:, None] * stride_on + offs_o[None, :] * stride_oo
        mask = mask_n[:, None] & mask_o[None, :]
        if ACCUMULATE:
            acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)



def _check(x_a: torch.Tensor, B: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
           out: torch.Tensor | None) -> None:
    if x_a.dim() != 2 or B.dim() != 2 or u.dim() != 1 or v.dim() != 1:
        raise ValueError(f"scaled_lowrank: expected x_a (N, r), B (out, r), u (r,), v (out,); got "
                         f"{tuple(x_a.shape)}, {tuple(B.shape)}, {tuple(u.shape)}, {tuple(v.shape)}")
    n, r = x_a.shape
    n_out = B.shape[0]
    if B.shape[1] != r or u.shape[0] != r or v.shape[0] != n_out:
        raise ValueError(f"scaled_lowrank: shapes do not fit: x_a {tuple(x_a.shape)}, B {tuple(B.shape)}, "
                         f"u {tuple(u.shape)}, v {tuple(v.shape)}")
    if out is not None and tuple(out.shape) != (n, n_out):
        raise ValueError(f"scaled_lowrank: out must have shape {(n, n_out)}, got {tuple(out.shape)}")
    for name, t in (("x_a", x_a), ("B", B), ("u", u), ("v", v), ("out", out)):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise ValueError(f"scaled_lowrank: {name} has dtype {t.dtype}; the kernel takes float32, "
                             "float16 and bfloat16")


def scaled_lowrank(x_a: torch.Tensor, B: torch.Tensor, u: torch.Tensor, v: torch.Tensor, s: float,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel: ``s * v ⊙ (B (u ⊙ x_a))`` for every row of ``x_a`` (``N x r``).

    With ``out`` (``N x out``) the update is added into it in place (fp32 accumulation, one rounding
    to ``out.dtype``) and ``out`` is returned; otherwise a new ``N x out`` tensor of ``x_a.dtype``.
    Forward only (see :class:`ScaledLowRank`). Runs on CUDA tensors, or on CPU tensors under
    ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("scaled_lowrank needs triton (pip install triton); use scaled_lowrank_torch")
    _check(x_a, B, u, v, out)
    n, r = x_a.shape
    n_out = B.shape[0]
    accumulate = out is not None
    if out is None:
        out = torch.empty((n, n_out), device=x_a.device, dtype=x_a.dtype)
    if n == 0 or n_out == 0:
        return out
    precision = "tf32" if x_a.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"
    block_n, block_o, block_r = block(n, 16, 64), block(n_out, 16, 64), block(r, 16, 64)
    grid = (triton.cdiv(n, block_n), triton.cdiv(n_out, block_o))
    _scaled_lowrank_kernel[grid](
        x_a, B, u, v, out, n, r, n_out, float(s),
        x_a.stride(0), x_a.stride(1), B.stride(0), B.stride(1), out.stride(0), out.stride(1),
        ACCUMULATE=accumulate, PRECISION=precision, BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_R=block_r)
    return out


class ScaledLowRank(torch.autograd.Function):
    """:func:`scaled_lowrank` with a torch backward (the kernel itself is forward-only).

    With ``h = u ⊙ x_a`` and ``g`` the output gradient: ``∂x_a = ((s v ⊙ g) B) ⊙ u``,
    ``∂u = Σ_n ((s v ⊙ g) B) ⊙ x_a``, ``∂B = (s v ⊙ g)^T h``, ``∂v = s Σ_n g ⊙ (h B^T)``.
    """

    @staticmethod
    def forward(ctx: Any, x_a: torch.Tensor, B: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                s: float) -> torch.Tensor:
        ctx.save_for_backward(x_a, B, u, v)
        ctx.s = s
        return scaled_lowrank(x_a, B, u, v, s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_a, B, u, v = ctx.saved_tensors
        s = ctx.s
        g = grad.to(B.dtype)
        gv = g * (v * s)
        gh = gv @ B
        need = ctx.needs_input_grad
        h = x_a * u if (need[1] or need[3]) else None
        grad_x_a = (gh * u).to(x_a.dtype) if need[0] else None
        grad_B = (gv.t() @ h).to(B.dtype) if need[1] else None
        grad_u = (gh * x_a).sum(0).to(u.dtype) if need[2] else None
        grad_v = ((g * (h @ B.t())).sum(0) * s).to(v.dtype) if need[3] else None
        return grad_x_a, grad_B, grad_u, grad_v, None


def add_scaled_lowrank(result: torch.Tensor, x_a: torch.Tensor, B: torch.Tensor, u: torch.Tensor,
                       v: torch.Tensor, s: float) -> torch.Tensor:
    """``result + s * v ⊙ (B (u ⊙ x_a))`` over any leading dims (``x_a``: ``... x r``).

    On CUDA with triton: the kernel, adding into ``result`` in place when no gradient is needed,
    through :class:`ScaledLowRank` otherwise. Elsewhere: :func:`scaled_lowrank_torch`, the update
    computed in the adapter's dtype and cast to ``result.dtype`` before the add.
    """
    n_out = B.shape[0]
    kernel = (use_triton(x_a, B, u, v, result) and x_a.dtype in KERNEL_DTYPES
              and B.dtype in KERNEL_DTYPES and result.dtype in KERNEL_DTYPES)
    if not kernel:
        return result + scaled_lowrank_torch(x_a, B, u, v, s).to(result.dtype)
    x2 = x_a.reshape(-1, x_a.shape[-1])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_a, B, u, v, result))
    if not needs_grad and result.is_contiguous() and result.shape[-1] == n_out:
        scaled_lowrank(x2, B, u, v, s, out=result.view(-1, n_out))
        return result
    update = ScaledLowRank.apply(x2, B, u, v, s)
    return result + update.reshape(*x_a.shape[:-1], n_out).to(result.dtype)
