"""``dora``: weight-decomposed low-rank adaptation (Liu et al. 2024, arXiv 2402.09353, ICML'24).

DoRA splits the adapted weight into a magnitude and a direction; the direction is updated by LoRA:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row,      s = alpha / r  (alpha / sqrt(r) with rslora)

``W0``: ``out x in`` (dequantized for a quantized base, ``weight^T`` for GPT-2's Conv1D),
``A``: ``r x in``, ``B``: ``out x r``, ``m``: ``out``. ``||.||_row`` is the L2 norm of each output row
(``dim=1`` of the ``out x in`` matrix -- the paper's "column-wise" norm in its ``in x out``
convention). Init: ``A`` as LoRA (kaiming_uniform(a=sqrt 5), or N(0, 1/r) with ``init="gaussian"``),
``B = 0`` and ``m = ||W0||_row``, so ``W' = W0`` and the output equals the base at the start.

Forward (paper section 4.3, as PEFT's ``DoraLinearLayer`` and the official code): the norm is treated
as a constant, ``n = ||W0 + s B A||_row.detach()`` -- no gradient flows through it, so training needs
no ``out x in`` activation -- and with ``g = m / n``

    y = W0 x + (g - 1) * (W0 x) + g * (s B A dropout(x)) + b

i.e. ``g * (W0 + s B A) x + b``: the bias is not scaled by ``g``. The norm is computed in fp32 (the
adapter dtype: fp64 for an fp64 base). Trainable: ``lora_magnitude_vector`` (``m``, PEFT's on-disk
key ``<module>.lora_magnitude_vector``), ``lora_A.weight``, ``lora_B.weight``: ``r (in + out) + out``.

Dropout touches only the LoRA term, as the paper's formula says: the base term always uses the
un-dropped ``x``. PEFT agrees in eval mode and with ``dropout=0``; in training with ``dropout > 0``
PEFT instead computes ``(g - 1) * (W0 dropout(x))`` (a second base matmul on the dropped input),
which we do not follow.

Merge is exact: ``W = (m / n) * (W0 + s B A)``, so ``delta_weight() = W - W0`` reads the base weight
(``delta_reads_base``): the generic unmerge subtracts the cached delta.

On CUDA the row norm runs in a Triton kernel (:func:`dora_row_norm_triton`) that computes
``||W0_i + s (B A)_i||`` blockwise over ``in`` -- each tile of ``B A`` is made in registers from
``B`` (rows) and ``A`` (columns) -- so neither ``B A`` nor ``W0 + s B A`` is ever written to memory
and ``W0`` is read once; the torch path (:func:`dora_row_norm_torch`) is the reference elsewhere.
Wraps Linear, GPT-2 Conv1D and quantized Linears (QDoRA: ``dora(...) on nf4``); not embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.plugins._triton import use_triton
from adapterhub.plugins.lora import LoraParams, adapter_factory, init_lora_A, set_lora_attributes
from adapterhub.registry import (
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    Variant,
    hookimpl,
)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

KINDS = frozenset({"linear", "conv1d"})
_KERNEL_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class DoraParams(LoraParams):
    """Same parameters as ``lora``: r, alpha, dropout, rslora, init (``m`` needs none)."""


# --------------------------------------------------------------------------- row norm


def dora_row_norm_torch(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W0 + s B A||`` per output row (``w0``: out x in), in ``a``'s dtype, without autograd."""
    with torch.no_grad():
        return torch.linalg.vector_norm(w0.to(a.dtype) + (b @ a) * scaling, dim=1)


if triton is not None:

    @triton.jit
    def _dora_row_norm_kernel(w_ptr, a_ptr, b_ptr, out_ptr, n_out, n_in, rank, scaling,
                              stride_wo, stride_wi, stride_ar, stride_ai, stride_bo, stride_br,
                              BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr):
        """One program: ``BLOCK_O`` rows; sums ``(W0 + s B A)^2`` over ``in`` in ``BLOCK_I`` tiles."""
        rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        ranks = tl.arange(0, BLOCK_R)
        row_ok = rows < n_out
        rank_ok = ranks < rank
        b = tl.load(b_ptr + rows[:, None] * stride_bo + ranks[None, :] * stride_br,
                    mask=row_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32) * scaling
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for start in range(0, n_in, BLOCK_I):
            cols = start + tl.arange(0, BLOCK_I)
            col_ok = cols < n_in
            w = tl.load(w_ptr + rows[:, None] * stride_wo + cols[None, :] * stride_wi,
                        mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            a = tl.load(a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ai,
                        mask=rank_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            v = w + tl.dot(b, a, input_precision="ieee")
            acc += tl.sum(v * v, axis=1)
        tl.store(out_ptr + rows, tl.sqrt(acc), mask=row_ok)


def dora_row_norm_triton(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float,
                         block_out: int = 32, block_in: int = 64) -> torch.Tensor:
    """The Triton row norm (fp32): same result as :func:`dora_row_norm_torch` for fp32 ``a``/``b``.

    ``w0`` (out x in, any strides: a Conv1D weight's transpose is fine) may be fp32/fp16/bf16.
    Runs on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    if triton is None:
        raise RuntimeError("dora_row_norm_triton needs triton (pip install triton)")
    n_out, n_in = w0.shape
    rank = a.shape[0]
    if a.shape != (rank, n_in) or b.shape != (n_out, rank):
        raise ValueError(f"dora row norm: shapes W0 {tuple(w0.shape)}, A {tuple(a.shape)}, B {tuple(b.shape)} "
                         f"do not fit (W0: out x in, A: r x in, B: out x r)")
    out = torch.empty(n_out, device=w0.device, dtype=torch.float32)
    block_r = max(16, triton.next_power_of_2(rank))  # tl.dot needs every dimension >= 16
    grid = (triton.cdiv(n_out, block_out),)
    _dora_row_norm_kernel[grid](w0, a, b, out, n_out, n_in, rank, float(scaling),
                                w0.stride(0), w0.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                BLOCK_O=block_out, BLOCK_I=block_in, BLOCK_R=block_r)
    return out


def dora_row_norm(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``||W0 + s B A||_row`` (detached): the Triton kernel on CUDA for fp32 adapters, else torch."""
    if (use_triton(w0, a, b) and a.dtype == torch.float32 and b.dtype == torch.float32
            and w0.dtype in _KERNEL_WEIGHT_DTYPES):
        with torch.no_grad():
            return dora_row_norm_triton(w0.detach(), a.detach(), b.detach(), scaling)
    return dora_row_norm_torch(w0, a, b, scaling)


# --------------------------------------------------------------------------- layer


class DoraLayer(AdapterLayer):
    """DoRA around a Linear, GPT-2 Conv1D or quantized Linear (see the module docstring).

    Tensors: ``lora_A.weight`` (r x in), ``lora_B.weight`` (out x r), ``lora_magnitude_vector`` (out).
    Attributes: ``r``, ``alpha``, ``scaling``, ``rslora``, ``dropout``, ``init``.
    """

    variant = "dora"
    delta_reads_base = True

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 rslora: bool = False, init: str = "kaiming"):
        super().__init__(base_layer)
        if self.kind not in KINDS:
            raise ModuleTypeError(f"dora cannot wrap a {type(base_layer).__name__} "
                                  f"(it wraps: {', '.join(sorted(KINDS))})")
        set_lora_attributes(self, r, alpha, dropout, rslora, init)
        factory = adapter_factory(base_layer)
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, **factory)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, **factory)
        self.lora_magnitude_vector = nn.Parameter(torch.empty(self.out_features, **factory))
        self.reset_dora_parameters()

    def reset_dora_parameters(self) -> None:
        """``A`` as LoRA, ``B = 0``, ``m = ||W0||_row`` (so the output equals the base)."""
        with torch.no_grad():
            init_lora_A(self.lora_A.weight, self.init, self.r)
            nn.init.zeros_(self.lora_B.weight)
            self.lora_magnitude_vector.copy_(self.weight_norm())

    @property
    def adapter_dtype(self) -> torch.dtype:
        return self.lora_A.weight.dtype

    def weight_norm(self, w0: torch.Tensor | None = None) -> torch.Tensor:
        """``n = ||W0 + s B A||_row``, detached, in the adapter dtype (fp32)."""
        w0 = self.base_weight() if w0 is None else w0
        return dora_row_norm(w0, self.lora_A.weight, self.lora_B.weight, self.scaling).to(self.adapter_dtype)

    def _base_terms(self, x: torch.Tensor, w0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W0 x, b)`` in the dtype the base layer itself would compute in."""
        base = self.base_layer
        bias = base.bias
        if self.is_quantized:
            dtype = base.compute_dtype or x.dtype
            x, w0 = x.to(dtype), w0.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return F.linear(x, w0), bias

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``W0 x + (g - 1) (W0 x) + g (s B A dropout(x)) + b`` with ``g = m / n``, ``n`` detached."""
        w0 = self.base_weight()
        w0x, bias = self._base_terms(x, w0)
        g = self.lora_magnitude_vector / self.weight_norm(w0)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.adapter_dtype)))) * self.scaling
        update = (g - 1) * w0x.to(self.adapter_dtype) + g * lora
        y = w0x + update.to(w0x.dtype)
        return y + bias if bias is not None else y

    def delta_weight(self) -> torch.Tensor:
        """``(m / n) (W0 + s B A) - W0`` in the base module's layout (adapter dtype)."""
        w0 = self.base_weight()
        n = self.weight_norm(w0)
        w0 = w0.to(self.adapter_dtype)
        direction = w0 + (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        merged = (self.lora_magnitude_vector / n).unsqueeze(1) * direction
        return self.to_base_layout(merged - w0)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, rslora={self.rslora}"


class Dora(Variant):
    name = "dora"
    Params = DoraParams
    kinds = KINDS
    summary = "magnitude m and LoRA-updated direction: m (W0 + (alpha/r) B A) / ||W0 + (alpha/r) B A||_row"
    paper = ("Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024, arXiv 2402.09353")
    mergeable = True

    def trainable_params(self, params: DoraParams, info: ModuleInfo) -> int:
        """``r * (in + out) + out`` (A, B and the magnitude vector)."""
        self.check_module(info)
        return params.r * (info.in_features + info.out_features) + info.out_features

    def wrap(self, module: nn.Module, params: DoraParams, ctx: ApplyContext, name: str) -> DoraLayer:
        self.check_wrappable(module, name)
        return DoraLayer(module, r=params.r, alpha=params.alpha, dropout=params.dropout,
                         rslora=params.rslora, init=params.init)


@hookimpl
def register_variants(register):
    register(Dora)
