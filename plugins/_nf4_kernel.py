"""QLoRA in Triton: a GEMM that reads bitsandbytes 4-bit codes, dequantizes in registers, plus the LoRA epilogue.

For a :class:`~adapterhub.plugins._bnb.Bnb4bitLinear` base (``nf4``; ``fp4`` shares the layout, only its
16-entry ``quant_map`` differs) holding ``W`` (``N x K``, flattened row-major to ``w``):

    w[i] = quant_map[code(i)] * absmax(i // blocksize),   code(i) = byte[i // 2] >> 4 (i even) | & 15 (odd)
    absmax(j) = nested_quant_map[absmax_code[j]] * nested_absmax[j // 256] + nested_offset   (double quant)
    absmax(j) = absmax[j]                                                                    (otherwise)

Forward: ``y = x W^T + b + s (x A^T) B^T``. Every ``BLOCK_K x BLOCK_N`` tile of ``W^T`` is decoded in
registers from the packed bytes and the block scales -- rounded through the weight dtype to the compute
dtype exactly as :meth:`Bnb4bitLinear.dequantize` + :meth:`QuantizedLinear.forward` round it -- and fed
to ``tl.dot``; the epilogue adds the bias and ``s xa B^T`` (``xa = x A^T`` from the shrink kernel of
:mod:`._lora_kernel`) before the single write of ``y``. No 16-bit ``W`` exists in memory at any point.

Backward saves ``x`` and ``xa`` only (the codes stay in the module): ``gB = g B`` once; ``dx = g W + s gB A``
by the same kernel with the flat index walked transposed (tiles of ``W`` instead of ``W^T``), again
dequantized tile by tile; ``dA = s gB^T x``, ``dB = s g^T xa`` by the shrink kernel. ``W`` and the frozen
bias get no gradient. ``x`` is cast to the compute dtype (the module's ``compute_dtype`` or ``x``'s)
in registers; the result is in ``x``'s dtype, as the torch path returns it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapterhub.registry import QuantizedLinear

from . import _tile_tuning as tiles
from ._bnb import NESTED_BLOCKSIZE, Bnb4bitLinear
from ._lora_kernel import (
    KERNEL_DTYPES,
    _need_triton,
    interpreter_upcast,
    lowrank_grads,
    precision,
    shrink,
)

try:
    import triton
    import triton.language as tl

    from ._lora_kernel import _lowrank_epilogue, _rne_bf16, _tile_ids
except ImportError:  # pragma: no cover - triton is optional
    triton = None

#: dtype codes the kernel rounds through: 0 none (fp32), 1 bfloat16, 2 float16
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


if triton is not None:

    @triton.jit
    def _round_to(v, CODE: tl.constexpr, RNE: tl.constexpr):
        """``v`` as the dtype of code ``CODE`` (see ``_CODES``). ``RNE``: round fp32 -> bf16 to nearest-even
        by hand (the CPU interpreter truncates; a GPU rounds to nearest-even itself)."""
        if CODE == 1:
            if RNE:
                v = _rne_bf16(v)
            return v.to(tl.bfloat16)
        elif CODE == 2:
            return v.to(tl.float16)
        else:
            return v.to(tl.float32)

    @triton.jit
    def _dequant_tile(q_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nqmap_ptr, noff_ptr, flat, mask, blocksize,
                      DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr):
        """fp32 weights at the flat indices ``flat`` (see the module docstring for the layout)."""
        byte = tl.load(q_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
        code = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        value = tl.load(qmap_ptr + code, mask=mask, other=0.0)
        block = flat // blocksize
        if DOUBLE_QUANT:
            acode = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            scale = (tl.load(nqmap_ptr + acode, mask=mask, other=0.0)
                     * tl.load(nabs_ptr + block // NESTED, mask=mask, other=0.0) + tl.load(noff_ptr))
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        return value * scale

    @triton.jit
    def _nf4_lora_gemm_kernel(x_ptr, q_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nqmap_ptr, noff_ptr, bias_ptr,
                              l_ptr, r_ptr, out_ptr, M, N, K, R, s, blocksize, flat_k, flat_n,
                              stride_xm, stride_xk, stride_lm, stride_lr, stride_rr, stride_rn,
                              stride_om, stride_on,
                              DOUBLE_QUANT: tl.constexpr, NESTED: tl.constexpr, W_CODE: tl.constexpr,
                              C_CODE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
                              UPCAST: tl.constexpr, ROUND_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                              GROUP_M: tl.constexpr):
        """One tile of ``X Wop + bias + s L Rop`` with ``Wop[k, n] = w[k * flat_k + n * flat_n]``."""
        pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # M x stride may pass 2^31
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        col = offs_n.to(tl.int64) * flat_n
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            mask_w = mask_k[:, None] & mask_n[None, :]
            flat = offs_k.to(tl.int64)[:, None] * flat_k + col[None, :]
            w32 = _dequant_tile(q_ptr, absmax_ptr, qmap_ptr, nabs_ptr, nqmap_ptr, noff_ptr, flat, mask_w,
                                blocksize, DOUBLE_QUANT, NESTED)
            w = _round_to(_round_to(w32, W_CODE, UPCAST), C_CODE, UPCAST)
            x = _round_to(tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                                  mask=mask_m[:, None] & mask_k[None, :], other=0.0), C_CODE, UPCAST)
            if UPCAST:  # see _lora_kernel.interpreter_upcast; also rounds bf16 to nearest-even there
                x = x.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        if HAS_BIAS:  # in the compute dtype, as QuantizedLinear.forward adds it
            bias = _round_to(tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0), C_CODE, UPCAST)
            acc += bias.to(tl.float32)[None, :]
        acc = _lowrank_epilogue(acc, l_ptr, r_ptr, offs_m, offs_n, mask_m, mask_n, R, s,
                                stride_lm, stride_lr, stride_rr, stride_rn, PRECISION, BLOCK_R)
        if ROUND_OUT:
            acc = _rne_bf16(acc)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def compute_dtype(module: Bnb4bitLinear, x: torch.Tensor) -> torch.dtype:
    """The dtype ``QuantizedLinear.forward`` multiplies in: the module's ``compute_dtype`` or ``x``'s."""
    return module.compute_dtype or x.dtype


def nf4_lora_gemm(x: torch.Tensor, module: Bnb4bitLinear, *, transpose: bool = False,
                  bias: torch.Tensor | None = None, low: torch.Tensor | None = None, up: torch.Tensor | None = None,
                  s: float = 0.0, cdtype: torch.dtype | None = None,
                  out_dtype: torch.dtype | None = None, blocks: dict[str, int] | None = None) -> torch.Tensor:
    """``x @ W^T + bias + s * low @ up`` (``transpose=False``, ``x``: ``M x in``) or ``x @ W + s * low @ up``
    (``transpose=True``, ``x``: ``M x out``), ``W`` dequantized from ``module``'s codes tile by tile.

    ``cdtype`` (default: the module's compute dtype for ``x``) is the dtype of the products;
    ``out_dtype`` (default ``x.dtype``) the result's. ``low``/``up`` (``M x r``, ``r x N``) may be omitted.
    ``blocks``: the tile configuration (default: :func:`._tile_tuning.choose_blocks`).
    """
    _need_triton()
    n_out, n_in = module.out_features, module.in_features
    m, k = x.shape
    n = n_in if transpose else n_out
    if k != (n_out if transpose else n_in):
        raise ValueError(f"nf4_lora_gemm: x has {k} columns, the weight takes {n_out if transpose else n_in}")
    cdtype = cdtype or compute_dtype(module, x)
    out = torch.empty((m, n), device=x.device, dtype=out_dtype or x.dtype)
    if m == 0 or n == 0:
        return out
    if low is None:
        low, up = out.new_zeros((m, 0), dtype=torch.float32), out.new_zeros((0, n), dtype=torch.float32)
    dq = module.double_quant
    nested = (module.nested_absmax, module.nested_quant_map, module.nested_offset) if dq else (out, out, out)
    flat_k, flat_n = (n_in, 1) if transpose else (1, n_in)

    def launch(b: dict[str, int]) -> None:
        grid = (triton.cdiv(m, b["BLOCK_M"]) * triton.cdiv(n, b["BLOCK_N"]),)
        _nf4_lora_gemm_kernel[grid](
            x, module.qweight, module.absmax, module.quant_map, *nested, bias if bias is not None else out,
            low, up, out, m, n, k, low.shape[1], float(s), module.blocksize, flat_k, flat_n,
            x.stride(0), x.stride(1), low.stride(0), low.stride(1), up.stride(0), up.stride(1),
            out.stride(0), out.stride(1),
            DOUBLE_QUANT=dq, NESTED=NESTED_BLOCKSIZE, W_CODE=_CODES[module.weight_dtype], C_CODE=_CODES[cdtype],
            HAS_BIAS=bias is not None, PRECISION=precision(x), UPCAST=interpreter_upcast(module.weight_dtype, x)
            or interpreter_upcast(cdtype, x), ROUND_OUT=interpreter_upcast(out.dtype, x),
            GROUP_M=8, enable_fp_fusion=False, **b)  # no FMA: scale * code + offset rounds like bitsandbytes

    kernel = "nf4_lora_gemm_t" if transpose else "nf4_lora_gemm"
    launch(blocks or tiles.choose_blocks(kernel, x, m, n, k, low.shape[1], cdtype, launch))
    return out


class Nf4LoraFn(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` with ``W`` held as 4-bit codes in ``module``; 2-D ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: Bnb4bitLinear, A: torch.Tensor, B: torch.Tensor,
                s: float) -> torch.Tensor:
        xa = shrink(x, A.t())
        y = nf4_lora_gemm(x, module, bias=module.bias, low=xa, up=B.t(), s=s)
        ctx.save_for_backward(x, xa, A, B)
        ctx.module, ctx.s = module, s
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xa, A, B = ctx.saved_tensors
        module, s = ctx.module, ctx.s
        need = ctx.needs_input_grad
        gb, grad_a, grad_b = lowrank_grads(grad, x, xa, A, B, s, need[2], need[3])
        grad_x = None
        if need[0]:
            grad_x = nf4_lora_gemm(grad, module, transpose=True, low=gb, up=A, s=s,
                                   cdtype=compute_dtype(module, x), out_dtype=x.dtype)
        return grad_x, None, grad_a, grad_b, None


def fused_4bit_lora(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """QLoRA's fused forward for a LoRA layer over an unmodified :class:`Bnb4bitLinear`, else ``None``."""
    base = layer.base_layer
    if not isinstance(base, Bnb4bitLinear) or type(base).forward is not QuantizedLinear.forward:
        return None
    if base.weight_dtype not in KERNEL_DTYPES or compute_dtype(base, x) not in KERNEL_DTYPES:
        return None
    if base.qweight.device != x.device or (base.bias is not None and base.bias.requires_grad):
        return None
    x2 = x.reshape(-1, x.shape[-1])
    y = Nf4LoraFn.apply(x2, base, layer.lora_A.weight, layer.lora_B.weight, float(layer.scaling))
    return y.reshape(*x.shape[:-1], base.out_features)
