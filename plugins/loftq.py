"""``loftq``: LoRA-fine-tuning-aware quantization (Li et al. 2023, LoftQ, arXiv 2310.08659).

LoftQ is QLoRA with a better starting point. Instead of ``Q = q(W)`` and ``B = 0`` it chooses the
quantized base and the LoRA factors *jointly* so that the adapted layer starts close to the
full-precision ``W`` (``out x in``):

    W ~= deq(Q) + s B A,   A: r x in,  B: out x r,  s = alpha / r  (alpha / sqrt(r) with rslora)

by alternating quantization and SVD for ``T = iters`` steps (the paper's Algorithm 1):

    A_0 = B_0 = 0
    for t = 1..T:
        Q_t = q(W - s B_{t-1} A_{t-1})
        U S V^T = SVD(W - deq(Q_t))                     (fp32, on the weight's device)
        B_t = U_r sqrt(S_r) / sqrt(s),   A_t = sqrt(S_r) V_r^T / sqrt(s)

so ``s B_t A_t = U_r S_r V_r^T`` is the best rank-``r`` fit of the quantization residual. ``q`` is the
rule's own quantizer with the rule's own parameters (``loftq(...) on nf4`` / ``fp4`` / ``int8`` / any
quantizer whose ``quantize`` returns a :class:`QuantizedLinear`), and the ``Q_t`` that the init used
*is* the runtime base: the init quantizer is bit-identical to the runtime one.

**Best iterate.** The SVD step is optimal for its ``Q_t``, but the quantization step is not a
minimiser (blockwise absmax rounding re-derives its scales from its input), so the error
``e_t = ||W - deq(Q_t) - s B_t A_t||_F`` can rise at some step. The layer keeps the iterate with the
smallest ``e_t`` (the earliest on ties); hence its error never grows with ``T`` and is always below
plain QLoRA's ``e_0 = ||W - deq(q(W))||_F`` (already ``e_1 < e_0`` unless the residual is 0).
``layer.loftq_errors = (e_0, e_1, ..., e_T)`` and ``layer.loftq_iter`` (the ``t`` kept) record it.

**After init it is a LoRA** (:class:`~adapterhub.plugins.lora.LoraLayer`) on the quantized base: same
forward ``y = deq(Q) x + b + s B A dropout(x)``, same tensors ``lora_A.weight`` / ``lora_B.weight``,
both trained, ``r (in + out)`` of them; merge is LoRA's exact 16-bit merge ``deq(Q) + s B A`` (a
dense layer; like QLoRA there is no exact merge back to N bits). GPT-2's Conv1D is transposed to
``out x in`` first: the quantized base is Linear-like. Loading a bundle re-runs this init on the same
base weights (deterministic; the randomized SVD uses its own seeded generator) and then loads ``A``, ``B``.
A bundle also saves the quantized base itself (``base_quant.safetensors``, see ``plugins/_saved_base.py``);
loading one restores that ``Q`` and skips the init (one plain quantization builds the base's structure).

**SVD.** ``svd="exact"``: ``torch.linalg.svd``; ``"randomized"``: a seeded randomized range finder
(Halko et al. 2011, ``r + max(r, 32)`` columns, 8 power iterations) for large matrices; ``"auto"``
(default) is exact when ``min(out, in) <= 4096``.

**Where PEFT differs** (``peft.utils.loftq_utils.loftq_init``): it assigns ``B = U_r sqrt(S_r)``,
``A = sqrt(S_r) V_r^T`` ignoring ``s`` (PEFT issue #1982), so with ``alpha != r`` its layer starts at
``deq(Q) + s U_r S_r V_r^T``, not near ``W``; we divide each factor by ``sqrt(s)`` (as LQ-LoRA does).
PEFT's init also quantizes NF4 without double quantization while the runtime base may use it, keeps
the last iterate rather than the best, supports only nf4/int8, and needs CUDA. Defaults follow PEFT
(``iters=1``); the paper's example uses ``iters=5``, ``r=16``, ``alpha=16``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from adapterhub.registry import (
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    QuantizedLinear,
    Quantizer,
    Variant,
    hookimpl,
    module_kind,
    param,
)

from ._saved_base import will_restore
from .lora import LoraLayer, lora_scaling

#: ``svd="auto"`` computes the exact SVD up to this ``min(out, in)``, the randomized one above it.
EXACT_SVD_MAX = 4096
_POWER_ITERS = 8
_SVD_SEED = 0


@dataclass(frozen=True)
class LoftqParams:
    r: int = param(16, "rank of the update B A", positive=True)
    alpha: float = param(16.0, "lora_alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)",
                         positive=True)
    rslora: bool = param(False, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    iters: int = param(1, "alternating quantize/SVD steps T (PEFT's default 1; the paper's example uses 5)",
                       positive=True)
    dropout: float = param(0.0, "dropout probability on the adapter's input (0 <= p < 1)", min=0.0)
    svd: Literal["auto", "exact", "randomized"] = param(
        "auto", "SVD of the residual: exact, randomized (large matrices) or auto (exact up to 4096)")

    def __post_init__(self) -> None:
        if not 0.0 <= self.dropout < 1.0:
            raise ParamError(f"dropout must be >= 0 and < 1, got {self.dropout!r}", param="dropout")


@dataclass
class LoftqResult:
    """What :func:`loftq_decompose` found: the kept iterate and the error of every step."""

    base: QuantizedLinear  # Q_t* -- the runtime base
    lora_A: torch.Tensor  # r x in, fp32
    lora_B: torch.Tensor  # out x r, fp32
    errors: tuple[float, ...]  # (e_0 = ||W - deq(q(W))||_F, e_1, ..., e_T)
    best_iter: int  # t* = argmin_t e_t (earliest on ties)
    target: torch.Tensor  # W - s B_{t*-1} A_{t*-1}: the matrix Q_t* quantizes (out x in, W's dtype)


def randomized_svd(m: torch.Tensor, k: int, *, oversample: int | None = None, power_iters: int = _POWER_ITERS,
                   seed: int = _SVD_SEED) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``k`` ``U, S, Vh`` of ``m`` by a randomized range finder with power iterations
    (Halko, Martinsson & Tropp 2011), drawing from its own generator seeded with ``seed``."""
    rows, cols = m.shape
    q = min(k + (oversample if oversample is not None else max(k, 32)), rows, cols)
    gen = torch.Generator(device=m.device).manual_seed(seed)
    omega = torch.randn(cols, q, generator=gen, device=m.device, dtype=m.dtype)
    basis = torch.linalg.qr(m @ omega).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(m @ torch.linalg.qr(m.t() @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.t() @ m, full_matrices=False)
    return (basis @ u)[:, :k], s[:k], vh[:k]


def _top_svd(m: torch.Tensor, k: int, method: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if method == "randomized" or (method == "auto" and min(m.shape) > EXACT_SVD_MAX):
        return randomized_svd(m, k)
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


@torch.no_grad()
def loftq_decompose(weight: torch.Tensor, quantize: Callable[[torch.Tensor], QuantizedLinear], r: int,
                    scaling: float, iters: int, svd: str = "auto") -> LoftqResult:
    """LoftQ's alternating quantization and rank-``r`` SVD of ``weight`` (``out x in``).

    ``quantize(target)`` quantizes an ``out x in`` matrix (in ``weight``'s dtype) with the runtime
    quantizer; the factors satisfy ``deq(Q) + scaling * B @ A ~= weight`` (see the module docstring).
    """
    if r > min(weight.shape):
        raise ParamError(f"r={r} exceeds min(out, in)={min(weight.shape)}: the residual has no rank-{r} "
                         "factors", param="r")
    if iters < 1:
        raise ParamError(f"iters must be a positive int, got {iters!r}", param="iters")
    w = weight.detach().float()
    lowrank = torch.zeros_like(w)  # s B_{t-1} A_{t-1}
    errors: list[float] = []
    best: LoftqResult | None = None
    for t in range(1, iters + 1):
        target = (w - lowrank).to(weight.dtype) if t > 1 else weight.detach()
        base = quantize(target)
        residual = w - base.dequantize().float()
        if t == 1:
            errors.append(float(torch.linalg.matrix_norm(residual)))
        u, s, vh = _top_svd(residual, r, svd)
        root = torch.sqrt(s.clamp_min(0) / scaling)
        lora_B, lora_A = u * root, root[:, None] * vh
        lowrank = scaling * (lora_B @ lora_A)
        errors.append(float(torch.linalg.matrix_norm(residual - lowrank)))
        if best is None or errors[-1] < errors[best.best_iter]:
            best = LoftqResult(base, lora_A, lora_B, (), t, target)
    assert best is not None
    best.errors = tuple(errors)
    return best


def _as_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` (``out x in``) and ``bias`` without copying them."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return lin


class LoftqLayer(LoraLayer):
    """A LoRA layer (same forward, tensors and merge) whose base and factors come from LoftQ.

    ``loftq_errors`` = ``(e_0, ..., e_T)`` (Frobenius, ``e_0`` = plain QLoRA's); ``loftq_iter`` = the
    ``t`` kept; ``loftq_weight_norm`` = ``||W||_F``. These describe the init and are not saved (a layer
    restored from a bundle's saved base has ``loftq_errors = ()`` and ``loftq_iter = 0``).
    """

    variant = "loftq"

    def __init__(self, base_layer: QuantizedLinear, result: LoftqResult, *, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, iters: int = 1, weight_norm: float = float("nan")):
        super().__init__(base_layer, r=result.lora_A.shape[0], alpha=alpha, dropout=dropout, rslora=rslora,
                         init="loftq")
        with torch.no_grad():
            self.lora_A.weight.copy_(result.lora_A)
            self.lora_B.weight.copy_(result.lora_B)
        self.iters = int(iters)
        self.loftq_errors = result.errors
        self.loftq_iter = result.best_iter
        self.loftq_weight_norm = weight_norm

    def extra_repr(self) -> str:
        if not self.loftq_errors:
            return f"{super().extra_repr()}, iters={self.iters}, base=restored"
        rel = self.loftq_errors[self.loftq_iter] / self.loftq_weight_norm if self.loftq_weight_norm else math.nan
        return f"{super().extra_repr()}, iters={self.iters}, kept_iter={self.loftq_iter}, rel_error={rel:.3g}"


class Loftq(Variant):
    name = "loftq"
    Params = LoftqParams
    kinds = frozenset({"linear", "conv1d"})
    summary = ("LoRA on a quantized base, both initialised by alternating quantization and SVD so that "
               "deq(Q) + (alpha/r) B A ~= W; needs `on nf4` (or fp4, int8)")
    paper = ("Li et al., LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large Language Models, 2023, "
             "arXiv 2310.08659")
    mergeable = True
    owns_quantization = True

    def trainable_params(self, params: LoftqParams, info: ModuleInfo) -> int:
        """``r * (in + out)``, as LoRA; a rule without ``on QUANT`` (or an already quantized module)
        is an error: LoftQ must quantize the full-precision weight itself."""
        self.check_module(info)
        if info.quantized is None:
            raise ParamError(self._needs_quant(info.name))
        if "quant_params" not in info.extra:
            raise ParamError(self._already_quantized(info.name, info.quantized))
        self._check_rank(params, info.name, info.in_features, info.out_features)
        return params.r * (info.in_features + info.out_features)

    def wrap(self, module: nn.Module, params: LoftqParams, ctx: ApplyContext, name: str) -> LoftqLayer:
        if isinstance(module, QuantizedLinear):
            raise ParamError(self._already_quantized(name, module.quantizer))
        raise ParamError(self._needs_quant(name))

    def wrap_quantized(self, module: nn.Module, params: LoftqParams, quantizer: Quantizer, quant_params: Any,
                       ctx: ApplyContext, name: str) -> LoftqLayer:
        if isinstance(module, QuantizedLinear):
            raise ParamError(self._already_quantized(name, module.quantizer))
        kind = module_kind(module)
        if kind not in self.kinds:
            raise ModuleTypeError(f"loftq cannot wrap module '{name}' of type {type(module).__name__} "
                                  f"(it wraps: {', '.join(sorted(self.kinds))})")
        weight = module.weight.detach()
        weight = weight.t().contiguous() if kind == "conv1d" else weight
        self._check_rank(params, name, weight.shape[1], weight.shape[0])
        bias = getattr(module, "bias", None)

        def quantize(target: torch.Tensor) -> QuantizedLinear:
            out = quantizer.quantize(_as_linear(target, bias), quant_params)
            if not isinstance(out, QuantizedLinear):
                raise ModuleTypeError(f"loftq needs a quantizer whose quantize() returns a QuantizedLinear; "
                                      f"{quantizer.name} returned a {type(out).__name__} for module '{name}'")
            return out

        if will_restore(name):  # the loader overwrites Q with the bundle's saved base, and loads A, B
            result = LoftqResult(quantize(weight), weight.new_zeros(params.r, weight.shape[1], dtype=torch.float32),
                                 weight.new_zeros(weight.shape[0], params.r, dtype=torch.float32), (), 0, weight)
            return LoftqLayer(result.base, result, alpha=params.alpha, dropout=params.dropout, rslora=params.rslora,
                              iters=params.iters)
        scaling = lora_scaling(params.r, params.alpha, params.rslora)
        result = loftq_decompose(weight, quantize, params.r, scaling, params.iters, params.svd)
        return LoftqLayer(result.base, result, alpha=params.alpha, dropout=params.dropout, rslora=params.rslora,
                          iters=params.iters, weight_norm=float(torch.linalg.matrix_norm(weight.float())))

    @staticmethod
    def _needs_quant(name: str) -> str:
        return (f"loftq needs a quantized base for module '{name}': write `-> loftq(...) on nf4` (or fp4, int8); "
                "its init quantizes W - s B A itself (without `on`, use lora)")

    @staticmethod
    def _already_quantized(name: str, quant: str | None) -> str:
        return (f"loftq needs the full-precision weight of module '{name}', which is already quantized "
                f"({quant}); apply loftq to the unquantized model with `on {quant or 'nf4'}`")

    @staticmethod
    def _check_rank(params: LoftqParams, name: str, in_features: int | None, out_features: int | None) -> None:
        smallest = min(in_features or params.r, out_features or params.r)
        if params.r > smallest:
            raise ParamError(f"loftq r={params.r} exceeds min(in, out)={smallest} of module '{name}': the "
                             "SVD has fewer than r factors", param="r")


@hookimpl
def register_variants(register):
    register(Loftq)
