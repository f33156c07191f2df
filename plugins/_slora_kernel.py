"""Triton kernels for the ``slora`` layer: many LoRA adapters in one batch (Punica's BGMV / SGMV).

Buffers as in :mod:`adapterhub.plugins.slora`: ``A`` (``S x R x in``), ``B`` (``S x out x R``), per-slot
``scaling`` (``S``) and ``rank`` (``S``, int32; rows ``>= rank`` of ``A`` / columns of ``B`` are zero
padding the kernels never read). With ``x`` flattened to tokens (``N x in``) and ``y`` the base output:

    shrink:  xa[n, :] = scaling[s_n] * A[s_n, :rank] x_n          (N x R_batch, float32)
    expand:  y[n, :] += B[s_n, :, :rank] xa[n, :rank]             (in place)

* **BGMV** (decode, one token per row): ``s_n`` per token (``-1``: no adapter -- nothing is read or
  written for it). One program per token (x a block of outputs for expand), reductions with ``tl.sum``.
* **SGMV** (prefill): tokens in segments ``[start_g, start_g + len_g)`` that share slot ``s_g`` (a batch
  row is one segment); each program multiplies a ``BLOCK_M``-token tile of one segment with that
  slot's matrix using ``tl.dot``. Rows without an adapter are simply not a segment.

All loads past a slot's rank are masked off, so lower-rank adapters cost less. Accumulation is in
float32; ``y`` keeps its dtype. Forward only (serving). The kernels run on CUDA tensors, or on CPU
under ``TRITON_INTERPRET=1`` (how tests/test_slora.py checks them against the torch reference).
"""

from __future__ import annotations

from typing import Any

import torch

from ._triton import block

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None


if triton is not None:

    @triton.jit
    def _bgmv_shrink_kernel(x_ptr, a_ptr, scale_ptr, rank_ptr, slot_ptr, xa_ptr, IN, R,
                            s_xn, s_xk, s_as, s_ar, s_ak, s_yn, s_yr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """Token ``n``, ranks ``[pid1 * BLOCK_R, +BLOCK_R)``: ``xa[n] = scaling[s] * A[s] x[n]``."""
        n = tl.program_id(0)
        offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
        s = tl.load(slot_ptr + n)
        valid = s >= 0
        s_safe = tl.where(valid, s, 0).to(tl.int64)
        rank = tl.where(valid, tl.load(rank_ptr + s_safe), 0)
        scale = tl.load(scale_ptr + s_safe).to(tl.float32)
        mask_r = (offs_r < rank) & (offs_r < R)
        k_lim = tl.where(rank > 0, IN, 0)  # a token without an adapter reads nothing
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_lim
            x = tl.load(x_ptr + n * s_xn + offs_k * s_xk, mask=mask_k, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + s_safe * s_as + offs_r[:, None] * s_ar + offs_k[None, :] * s_ak,
                        mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(a * x[None, :], axis=1)
        tl.store(xa_ptr + n * s_yn + offs_r * s_yr, acc * scale, mask=offs_r < R)

    @triton.jit
    def _bgmv_expand_kernel(xa_ptr, b_ptr, rank_ptr, slot_ptr, y_ptr, OUT, R,
                            s_xn, s_xr, s_bs, s_bo, s_br, s_yn, s_yo,
                            BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
        """Token ``n``, outputs ``[pid1 * BLOCK_O, +BLOCK_O)``: ``y[n] += B[s] xa[n]`` (skipped when s = -1)."""
        n = tl.program_id(0)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        s = tl.load(slot_ptr + n)
        valid = s >= 0
        s_safe = tl.where(valid, s, 0).to(tl.int64)
        rank = tl.where(valid, tl.load(rank_ptr + s_safe), 0)
        mask_o = offs_o < tl.where(rank > 0, OUT, 0)  # nothing read or written without an adapter
        acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = (offs_r < rank) & (offs_r < R)
            xa = tl.load(xa_ptr + n * s_xn + offs_r * s_xr, mask=mask_r, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + s_safe * s_bs + offs_o[:, None] * s_bo + offs_r[None, :] * s_br,
                        mask=mask_o[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(b * xa[None, :], axis=1)
        y_ptrs = y_ptr + n * s_yn + offs_o * s_yo
        acc += tl.load(y_ptrs, mask=mask_o, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_o)

    @triton.jit
    def _sgmv_shrink_kernel(x_ptr, a_ptr, scale_ptr, rank_ptr, start_ptr, len_ptr, seg_slot_ptr, xa_ptr, IN, R,
                            s_xn, s_xk, s_as, s_ar, s_ak, s_yn, s_yr, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
        """Segment ``g``, its tokens ``[pid1 * BLOCK_M, +BLOCK_M)``, ranks block ``pid2``:
        ``xa[tokens] = scaling[s_g] * x[tokens] A[s_g]^T``."""
        g = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
        start = tl.load(start_ptr + g).to(tl.int64)
        length = tl.load(len_ptr + g)
        s = tl.load(seg_slot_ptr + g).to(tl.int64)
        rank = tl.load(rank_ptr + s)
        scale = tl.load(scale_ptr + s).to(tl.float32)
        mask_m = offs_m < length
        mask_mx = offs_m < tl.where(rank > 0, length, 0)  # an empty slot reads nothing (writes zeros)
        mask_r = (offs_r < rank) & (offs_r < R)
        tokens = start + offs_m
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < IN
            x = tl.load(x_ptr + tokens[:, None] * s_xn + offs_k[None, :] * s_xk,
                        mask=mask_mx[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
            at = tl.load(a_ptr + s * s_as + offs_r[None, :] * s_ar + offs_k[:, None] * s_ak,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(x, at, acc, input_precision=PRECISION)
        tl.store(xa_ptr + tokens[:, None] * s_yn + offs_r[None, :] * s_yr, acc * scale,
                 mask=mask_m[:, None] & (offs_r < R)[None, :])

    @triton.jit
    def _sgmv_expand_kernel(xa_ptr, b_ptr, rank_ptr, start_ptr, len_ptr, seg_slot_ptr, y_ptr, OUT, R,
                            s_xn, s_xr, s_bs, s_bo, s_br, s_yn, s_yo, PRECISION: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr):
        """Segment ``g``, tokens block ``pid1``, outputs block ``pid2``: ``y[tokens] += xa[tokens] B[s_g]^T``."""
        g = tl.program_id(0)
        offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_o = tl.program_id(2) * BLOCK_O + tl.arange(0, BLOCK_O)
        start = tl.load(start_ptr + g).to(tl.int64)
        length = tl.load(len_ptr + g)
        s = tl.load(seg_slot_ptr + g).to(tl.int64)
        rank = tl.load(rank_ptr + s)
        mask_m = offs_m < tl.where(rank > 0, length, 0)  # an empty slot adds nothing
        mask_o = offs_o < OUT
        tokens = start + offs_m
        acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = (offs_r < rank) & (offs_r < R)
            xa = tl.load(xa_ptr + tokens[:, None] * s_xn + offs_r[None, :] * s_xr,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
            bt = tl.load(b_ptr + s * s_bs + offs_o[None, :] * s_bo + offs_r[:, None] * s_br,
                         mask=mask_r[:, None] & mask_o[None, :], other=0.0).to(tl.float32)
            acc = tl.dot(xa, bt, acc, input_precision=PRECISION)
        y_ptrs = y_ptr + tokens[:, None] * s_yn + offs_o[None, :] * s_yo
        mask = mask_m[:, None] & mask_o[None, :]
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the slora kernels need triton (pip install triton); the torch path needs nothing")



def _precision(t: torch.Tensor) -> str:
    return "tf32" if t.is_cuda and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _check(x: torch.Tensor, A: torch.Tensor, r: int) -> None:
    if x.dim() != 2 or A.dim() != 3 or x.shape[1] != A.shape[2]:
        raise ValueError(f"slora kernel: x must be (N, in) and A (slots, R, in); got {tuple(x.shape)}, "
                         f"{tuple(A.shape)}")
    if not 0 <= r <= A.shape[1]:
        raise ValueError(f"slora kernel: rank {r} outside 0..{A.shape[1]}")


def bgmv_shrink(x: torch.Tensor, A: torch.Tensor, scaling: torch.Tensor, rank: torch.Tensor,
                token_slots: torch.Tensor, r: int) -> torch.Tensor:
    """``N x r`` float32: ``scaling[s_n] * A[s_n, :r] x_n`` (zeros for ``s_n = -1`` and past a slot's rank)."""
    _need_triton()
    _check(x, A, r)
    n = x.shape[0]
    xa = torch.empty((n, r), device=x.device, dtype=torch.float32)
    if n == 0 or r == 0:
        return xa.zero_()
    block_r = block(r, 16, 64)
    block_k = block(x.shape[1], 16, 128)
    _bgmv_shrink_kernel[(n, triton.cdiv(r, block_r))](
        x, A, scaling, rank, token_slots, xa, x.shape[1], r,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), xa.stride(0), xa.stride(1),
        BLOCK_R=block_r, BLOCK_K=block_k)
    return xa


def bgmv_expand(xa: torch.Tensor, B: torch.Tensor, rank: torch.Tensor, token_slots: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
    """``y[n] += B[s_n, :, :r] xa[n]`` in place for every token with a slot; returns ``y``."""
    _need_triton()
    n, r = xa.shape
    n_out = B.shape[1]
    if tuple(y.shape) != (n, n_out) or r > B.shape[2]:
        raise ValueError(f"slora kernel: y must be {(n, n_out)} and r <= {B.shape[2]}; got {tuple(y.shape)}, r={r}")
    if n == 0 or r == 0 or n_out == 0:
        return y
    block_o, block_r = block(n_out, 16, 64), block(r, 16, 64)
    _bgmv_expand_kernel[(n, triton.cdiv(n_out, block_o))](
        xa, B, rank, token_slots, y, n_out, r,
        xa.stride(0), xa.stride(1), B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1),
        BLOCK_O=block_o, BLOCK_R=block_r)
    return y


def sgmv_shrink(x: torch.Tensor, A: torch.Tensor, scaling: torch.Tensor, rank: torch.Tensor,
                seg_start: torch.Tensor, seg_len: torch.Tensor, seg_slot: torch.Tensor, max_len: int,
                r: int) -> torch.Tensor:
    """``N x r`` float32 with ``scaling[s_g] * x_n A[s_g, :r]^T`` for the tokens of every segment
    (zeros past a slot's rank; tokens in no segment are left unwritten)."""
    _need_triton()
    _check(x, A, r)
    xa = torch.empty((x.shape[0], r), device=x.device, dtype=torch.float32)
    n_seg = seg_slot.shape[0]
    if n_seg == 0 or r == 0 or max_len == 0:
        return xa
    block_m, block_r, block_k = block(max_len, 16, 64), block(r, 16, 64), block(x.shape[1], 16, 64)
    grid = (n_seg, triton.cdiv(max_len, block_m), triton.cdiv(r, block_r))
    _sgmv_shrink_kernel[grid](
        x, A, scaling, rank, seg_start, seg_len, seg_slot, xa, x.shape[1], r,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), xa.stride(0), xa.stride(1),
        PRECISION=_precision(x), BLOCK_M=block_m, BLOCK_R=block_r, BLOCK_K=block_k)
    return xa


def sgmv_expand(xa: torch.Tensor, B: torch.Tensor, rank: torch.Tensor, seg_start: torch.Tensor,
                seg_len: torch.Tensor, seg_slot: torch.Tensor, max_len: int, y: torch.Tensor) -> torch.Tensor:
    """``y[n] += xa[n, :r] B[s_g, :, :r]^T`` in place for the tokens of every segment; returns ``y``."""
    _need_triton()
    r = xa.shape[1]
    n_out = B.shape[1]
    if y.shape[0] != xa.shape[0] or y.shape[1] != n_out or r > B.shape[2]:
        raise ValueError(f"slora kernel: y must be ({xa.shape[0]}, {n_out}) and r <= {B.shape[2]}; got "
                         f"{tuple(y.shape)}, r={r}")
    n_seg = seg_slot.shape[0]
    if n_seg == 0 or r == 0 or max_len == 0 or n_out == 0:
        return y
    block_m, block_o, block_r = block(max_len, 16, 64), block(n_out, 16, 64), block(r, 16, 64)
    grid = (n_seg, triton.cdiv(max_len, block_m), triton.cdiv(n_out, block_o))
    _sgmv_expand_kernel[grid](
        xa, B, rank, seg_start, seg_len, seg_slot, y, n_out, r,
        xa.stride(0), xa.stride(1), B.stride(0), B.stride(1), B.stride(2), y.stride(0), y.stride(1),
        PRECISION=_precision(xa), BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_R=block_r)
    return y


def slora_add_(y3: torch.Tensor, x3: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: torch.Tensor,
               rank: torch.Tensor, rows: Any) -> torch.Tensor:
    """What the layer calls: ``y3`` (``rows x T x out``, contiguous) ``+=`` every row's update, in place.

    ``T == 1`` runs BGMV over the tokens (per-token slots); ``T > 1`` runs SGMV with one segment per
    row that has an adapter. ``rows`` is an :class:`adapterhub.plugins.slora.SlotRows`.
    """
    n_rows, t, n_in = x3.shape
    x2 = x3.reshape(n_rows * t, n_in)
    y2 = y3.view(n_rows * t, y3.shape[-1])
    args = rows.kernel_args(t)
    r = min(rows.rank_max, A.shape[1])
    if t == 1:
        xa = bgmv_shrink(x2, A, scaling, rank, args["token_slots"], r)
        bgmv_expand(xa, B, rank, args["token_slots"], y2)
    else:
        xa = sgmv_shrink(x2, A, scaling, rank, args["seg_start"], args["seg_len"], args["seg_slot"], t, r)
        sgmv_expand(xa, B, rank, args["seg_start"], args["seg_len"], args["seg_slot"], t, y2)
    return y3
