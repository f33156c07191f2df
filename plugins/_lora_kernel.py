"""Fused LoRA linear: ``y = x W^T + b + s (x A^T) B^T`` forward and backward in Triton.

Shapes: ``x``: ``M x K`` (tokens x in), ``W``: ``N x K`` (frozen), ``b``: ``N``, ``A``: ``r x K``,
``B``: ``N x r``, ``s`` the LoRA scaling. Two kernels do all the work, each reading its operands
through strides, so every transpose below is a view, never a copy:

* :func:`shrink` -- ``out = c * X P`` with ``out`` skinny (``... x r``, fp32). It computes
  ``xa = x A^T`` (forward), ``gB = g B``, ``dA^T = s x^T gB`` and ``dB = s g^T xa`` (backward).
* :func:`lora_gemm` -- ``out = X Wop + bias + s * L Rop``: the ``X Wop`` accumulator runs over the
  inner dimension in fp32; the epilogue adds the bias and the rank-``r`` product ``L Rop`` into the
  same registers, and the tile is written once. Forward: ``X = x``, ``Wop = W^T``, ``L = xa``,
  ``Rop = B^T``; backward: ``dx = g W + s gB A`` with ``X = g``, ``Wop = W``, ``L = gB``, ``Rop = A``.

``xa`` is computed by its own shrink kernel, not inside the big GEMM's K loop: the GEMM is tiled over
``N`` as well, so accumulating ``x A^T`` there would redo it in every one of the ``N / BLOCK_N`` column
programs (``r / BLOCK_N`` extra MMA work) and hold a second ``BLOCK_M x r`` accumulator (r up to 128)
through the whole loop; the shrink reads ``x`` once more (``M K``, against ``N/BLOCK_N`` reads of it
by the GEMM itself) and writes ``xa`` once -- and backward needs ``xa`` stored anyway.

Saved for backward: ``x`` and ``xa`` (``M x r``, fp32) besides the parameters; never ``x W^T`` nor any
other ``M x N`` tensor. Backward computes ``gB = g B`` once and uses it for both
``dx = g W + s gB A`` (one fused GEMM) and ``dA = s gB^T x``; ``dB = s g^T xa``; ``db = sum_m g``
when the bias trains; the frozen ``W`` gets no gradient. Inputs may be fp32, fp16 or bf16; all
products accumulate in fp32 (the low-rank path entirely in fp32, as the torch path does with fp32
adapters), with one rounding to the output dtype.

:func:`fused_lora_linear` is what :class:`~adapterhub.plugins.lora.LoraLayer` calls; it returns
``None`` when the fused path does not apply (the layer then runs its torch path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapterhub.registry import AdapterhubError

from . import _tile_tuning as tiles
from ._triton import block, interpreting, use_triton

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

#: dtypes the kernels take (fp32 accumulation; fp64 stays on the torch path)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _lowrank_epilogue(acc, l_ptr, r_ptr, offs_m, offs_n, mask_m, mask_n, R, s,
                          stride_lm, stride_lr, stride_rr, stride_rn,
                          PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
        """``acc + s * L[offs_m, :] @ Rop[:, offs_n]`` in fp32, ``r`` walked in ``BLOCK_R`` chunks."""
        low = tl.zeros_like(acc)  # acc is fp32
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            lo = tl.load(l_ptr + offs_m[:, None] * stride_lm + offs_r[None, :] * stride_lr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            up = tl.load(r_ptr + offs_r[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                         mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            low = tl.dot(lo, up, low, input_precision=PRECISION)
        return acc + s * low

    @triton.jit
    def _rne_bf16(v):
        """fp32 ``v`` rounded to the nearest bf16 (ties to even), still as fp32: the CPU interpreter
        truncates on ``.to(tl.bfloat16)`` where a GPU rounds; see :func:`interpreter_upcast`."""
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        """Grouped program order: ``GROUP_M`` row tiles share each column tile while it is in L2."""
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        group_m = min(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % group_m
        pid_n = (pid % width) // group_m
        return pid_m, pid_n

    @triton.jit
    def _lora_gemm_kernel(x_ptr, w_ptr, bias_ptr, l_ptr, r_ptr, out_ptr, M, N, K, R, s,
                          stride_xm, stride_xk, stride_wk, stride_wn, stride_lm, stride_lr,
                          stride_rr, stride_rn, stride_om, stride_on,
                          HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                          ROUND_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                          GROUP_M: tl.constexpr):
        """One ``BLOCK_M x BLOCK_N`` tile of ``X Wop + bias + s L Rop`` (``X`` cast to ``Wop``'s dtype)."""
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x stride may pass 2^31
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(w.dtype)
            if UPCAST:  # exact: a bf16 product fits fp32; see interpreter_upcast()
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        acc = _lowrank_epilogue(acc, l_ptr, r_ptr, offs_m, offs_n, mask_m, mask_n, R, s,
                                stride_lm, stride_lr, stride_rr, stride_rn, PRECISION, BLOCK_R)
        if ROUND_OUT:
            acc = _rne_bf16(acc)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    @triton.jit
    def _shrink_kernel(x_ptr, p_ptr, out_ptr, M, K, R, c, k_per_split, stride_xm, stride_xk, stride_pk,
                       stride_pr, stride_os, stride_om, stride_or, PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
        """One ``BLOCK_M x BLOCK_R`` tile of ``c * X P`` (fp32 operands) over the inner range
        ``[s k_per_split, (s + 1) k_per_split)`` of split ``s`` = ``program_id(2)``, into ``out[s]``."""
        pid_m = tl.program_id(0)
        pid_r = tl.program_id(1)
        pid_s = tl.program_id(2)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x stride may pass 2^31
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_m = offs_m < M
        mask_r = offs_r < R
        k_lo = pid_s * k_per_split
        k_hi = min(K, k_lo + k_per_split)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # K runs over tokens for dA, dB
            mask_k = offs_k < k_hi
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            p = tl.load(p_ptr + offs_k[:, None] * stride_pk + offs_r[None, :] * stride_pr,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(x, p, acc, input_precision=PRECISION)
        tl.store(out_ptr + pid_s * stride_os + offs_m[:, None] * stride_om + offs_r[None, :] * stride_or,
                 acc * c, mask=mask_m[:, None] & mask_r[None, :])


def precision(t: torch.Tensor) -> str:
    """``tf32`` for fp32 dots on CUDA when torch allows it for its own matmuls, else ``ieee``."""
    return "tf32" if t.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def interpreter_upcast(dtype: torch.dtype, t: torch.Tensor) -> bool:
    """Triton 3.9's CPU interpreter gets ``tl.dot`` of bf16 tiles wrong (it has no numpy bf16) and
    truncates fp32 -> bf16 casts. There bf16 tiles go to fp32 before ``tl.dot`` (the same products,
    exact, and the same fp32 accumulation) and bf16 roundings are done to nearest-even by hand."""
    return dtype == torch.bfloat16 and (interpreting() or not t.is_cuda)


def _need_triton() -> None:
    if triton is None:
        raise AdapterhubError("the fused LoRA kernels need triton (pip install triton), or set "
                              "ADAPTERHUB_KERNELS=torch")


def shrink_splits(programs: int, steps: int, t: torch.Tensor) -> int:
    """How many slices the inner dimension of :func:`shrink` is cut into. ``dA`` and ``dB`` reduce over
    all tokens into an ``in x r`` / ``out x r`` result of few tiles: on a GPU the slices give ~2 programs
    per SM (each >= 4 inner steps); the interpreter cuts up to 4 so that small tests cover it."""
    if interpreting() or not t.is_cuda:
        return max(1, min(4, steps // 2))
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), steps // 4, 64))


def shrink(x: torch.Tensor, p: torch.Tensor, c: float = 1.0) -> torch.Tensor:
    """``c * x @ p`` as a new fp32 ``M x R`` tensor (``x``: ``M x K``, ``p``: ``K x R``, any strides).

    With ``S`` inner slices (:func:`shrink_splits`) the kernel writes ``S`` partial products and
    torch sums them in a fixed order: deterministic, no atomics.
    """
    _need_triton()
    m, k = x.shape
    r = p.shape[1]
    if m == 0 or r == 0 or k == 0:
        return torch.zeros((m, r), device=x.device, dtype=torch.float32)
    small = interpreting() or not x.is_cuda
    t = tiles.INTERPRET_TILE if small else 64
    block_m, block_k, block_r = block(m, 16, t), block(k, 16, t if small else 32), block(r, 16, t)
    programs = triton.cdiv(m, block_m) * triton.cdiv(r, block_r)
    steps = triton.cdiv(k, block_k)
    splits = shrink_splits(programs, steps, x)
    k_per_split = triton.cdiv(steps, splits) * block_k
    splits = triton.cdiv(k, k_per_split)
    out = torch.empty((splits, m, r), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(m, block_m), triton.cdiv(r, block_r), splits)
    _shrink_kernel[grid](x, p, out, m, k, r, float(c), k_per_split, x.stride(0), x.stride(1), p.stride(0),
                         p.stride(1), out.stride(0), out.stride(1), out.stride(2), PRECISION=precision(x),
                         BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r)
    return out[0] if splits == 1 else out.sum(0)


def lora_gemm(x: torch.Tensor, w_op: torch.Tensor, bias: torch.Tensor | None, low: torch.Tensor,
              up: torch.Tensor, s: float, out_dtype: torch.dtype, blocks: dict[str, int] | None = None) -> torch.Tensor:
    """``x @ w_op + bias + s * low @ up`` (``M x K``, ``K x N``, ``N``, ``M x r``, ``r x N``) in one kernel.

    ``x`` is cast to ``w_op``'s dtype in registers; fp32 accumulation; one write of the ``M x N`` result.
    ``blocks``: the tile configuration (default: :func:`._tile_tuning.choose_blocks`).
    """
    _need_triton()
    m, k = x.shape
    n = w_op.shape[1]
    r = low.shape[1]
    out = torch.empty((m, n), device=x.device, dtype=out_dtype)
    if m == 0 or n == 0:
        return out

    def launch(b: dict[str, int]) -> None:
        grid = (triton.cdiv(m, b["BLOCK_M"]) * triton.cdiv(n, b["BLOCK_N"]),)
        _lora_gemm_kernel[grid](
            x, w_op, bias if bias is not None else out, low, up, out, m, n, k, r, float(s),
            x.stride(0), x.stride(1), w_op.stride(0), w_op.stride(1), low.stride(0), low.stride(1),
            up.stride(0), up.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, PRECISION=precision(x), UPCAST=interpreter_upcast(w_op.dtype, x),
            ROUND_OUT=interpreter_upcast(out_dtype, x), GROUP_M=8, **b)

    launch(blocks or tiles.choose_blocks("lora_gemm", x, m, n, k, r, w_op.dtype, launch))
    return out


def lowrank_grads(g: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, A: torch.Tensor,
                  B: torch.Tensor, s: float, need_a: bool, need_b: bool) -> tuple[torch.Tensor, ...]:
    """``gB = g B`` and, when asked, ``dA = s gB^T x``, ``dB = s g^T xa`` (shared with the NF4 path)."""
    gb = shrink(g, B)
    grad_a = shrink(x.t(), gb, s).t().to(A.dtype) if need_a else None
    grad_b = shrink(g.t(), xa, s).to(B.dtype) if need_b else None
    return gb, grad_a, grad_b


class LoraLinearFn(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` for 2-D ``x`` and a frozen ``W``; see the module docstring."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, s: float) -> torch.Tensor:
        xa = shrink(x, A.t())
        y = lora_gemm(x, W.t(), bias, xa, B.t(), s, x.dtype)
        ctx.save_for_backward(x, xa, W, A, B)
        ctx.s = s
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xa, W, A, B = ctx.saved_tensors
        s = ctx.s
        need = ctx.needs_input_grad
        if need[1]:
            raise RuntimeError("LoraLinearFn: the base weight is frozen and gets no gradient")
        gb, grad_a, grad_b = lowrank_grads(grad, x, xa, A, B, s, need[3], need[4])
        grad_x = lora_gemm(grad, W, None, gb, A, s, x.dtype) if need[0] else None
        grad_bias = grad.sum(0, dtype=torch.float32).to(grad.dtype) if ctx.has_bias and need[2] else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


def lora_linear(x: torch.Tensor, W: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                B: torch.Tensor, s: float) -> torch.Tensor:
    """:class:`LoraLinearFn` over any leading dims of ``x`` (``... x K`` -> ``... x N``)."""
    y = LoraLinearFn.apply(x.reshape(-1, x.shape[-1]), W, bias, A, B, float(s))
    return y.reshape(*x.shape[:-1], W.shape[0])


def kernel_applies(layer: nn.Module, x: torch.Tensor, forced: bool) -> bool:
    """Whether the layer may take a fused path: eval mode or no dropout, no autocast, kernel dtypes,
    and triton usable for ``x`` (CUDA, or ``forced`` = ``ADAPTERHUB_KERNELS=triton``)."""
    if layer.training and not isinstance(layer.lora_dropout, nn.Identity):
        return False
    if x.numel() == 0 or torch.is_autocast_enabled(x.device.type):
        return False
    A, B = layer.lora_A.weight, layer.lora_B.weight
    if any(t.dtype not in KERNEL_DTYPES or t.device != x.device for t in (x, A, B)):
        return False
    if forced:
        _need_triton()
        if x.device.type == "cpu" and not interpreting():
            raise AdapterhubError("ADAPTERHUB_KERNELS=triton on CPU tensors needs TRITON_INTERPRET=1 set "
                                  "before triton is imported (the kernels run on CUDA)")
        return True
    return use_triton(x)


def fused_lora_linear(layer: nn.Module, x: torch.Tensor, forced: bool = False) -> torch.Tensor | None:
    """The fused forward of a LoRA layer over a plain ``nn.Linear``, GPT-2's ``Conv1D`` or a bitsandbytes 4-bit base,
    or ``None`` when it does not apply (anything else stays on the torch path)."""
    if not kernel_applies(layer, x, forced):
        return None
    base = layer.base_layer
    conv1d = type(base).__name__ == "Conv1D" and type(base).__module__.startswith("transformers.")
    if type(base) is nn.Linear or conv1d:
        W, bias = base.weight, base.bias
        if conv1d:  # GPT-2's Conv1D stores W^T (in x out): W is a view, no copy
            W = W.t()
        if W.requires_grad or W.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            return None
        return lora_linear(x, W, bias, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
    from ._nf4_kernel import fused_4bit_lora

    return fused_4bit_lora(layer, x)


def bench_fn(shape: tuple[int, int, int, int], *, dtype: torch.dtype = torch.bfloat16, quant: str | None = None,
             backward: bool = True, device: str = "cuda") -> dict[str, float]:
    """Milliseconds per LoRA layer call, fused vs torch path, for ``shape = (M, K, N, r)``.

    ``quant="nf4"`` (or ``"fp4"``) puts the LoRA on a 4-bit base (QLoRA). ``backward``: time forward +
    backward (gradients for ``x``, ``A``, ``B``). Returns ``fused_ms``, ``torch_ms`` and
    ``ratio = fused_ms / torch_ms``. CUDA: ``triton.testing.do_bench``; CPU (interpreter): a few timed runs.
    """
    import os
    import time

    from adapterhub.registry import get_registry

    from .lora import LoraLayer

    _need_triton()
    m, k, n, r = shape
    gen = torch.Generator(device="cpu").manual_seed(0)
    base: nn.Module = nn.Linear(k, n, device=device, dtype=dtype)
    if quant is not None:
        quantizer = get_registry().quantizers[quant]
        base = quantizer.quantize(base, quantizer.Params())
    layer = LoraLayer(base, r=r, alpha=2.0 * r).to(device)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(n, r, generator=gen) * 0.01)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype).requires_grad_(backward)
    g = torch.randn(m, n, generator=gen).to(device=device, dtype=dtype)

    def step() -> None:
        y = layer(x)
        if backward:
            y.backward(g)

    def timed(mode: str) -> float:
        old = os.environ.get("ADAPTERHUB_KERNELS")
        os.environ["ADAPTERHUB_KERNELS"] = mode
        try:
            if x.is_cuda:
                return float(triton.testing.do_bench(step))
            step()
            start = time.perf_counter()
            for _ in range(3):
                step()
            return (time.perf_counter() - start) / 3 * 1e3
        finally:
            if old is None:
                os.environ.pop("ADAPTERHUB_KERNELS")
            else:
                os.environ["ADAPTERHUB_KERNELS"] = old

    fused, plain = timed("triton"), timed("torch")
    return {"fused_ms": fused, "torch_ms": plain, "ratio": fused / plain}
