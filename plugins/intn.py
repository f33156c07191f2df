"""``int4`` / ``int3`` / ``int2``: group-wise asymmetric uniform INT-N base weights (GPTQ layout).

The ``out x in`` weight ``W`` is cut along the input dimension into groups of ``L = group``
consecutive columns (``L`` must divide ``in_features``); output row ``j`` and group ``l`` keep a
scale and a *float* zero-point (the min/max, i.e. asymmetric, form of QA-LoRA's
``W~ = alpha * W^ + beta`` with ``beta = min``)::

    scale[j, l] = (max_{i in g_l} W[j, i] - min_{i in g_l} W[j, i]) / (2^N - 1)
    zero[j, l]  = -min_{i in g_l} W[j, i] / scale[j, l]                (code units, fp32)
    q[j, i]     = clamp(round((W[j, i] - min) / scale), 0, 2^N - 1)    (round to nearest)
    W~[j, i]    = scale[j, l(i)] * (q[j, i] - zero[j, l(i)])

The zero-point is stored as fp32 and is not rounded to an integer (GPTQ/AutoGPTQ round it and pack
it as int4): a float zero-point is what lets QA-LoRA fold its group-constant update into the
zero-points exactly (``qalora``; ../shared/reference/variants.md section 3, "pitfalls").
A group whose values are all equal gets ``scale = |value| * eps`` (1 for an all-zero group) so
that it dequantizes to itself; scales never drop below ``eps * max|W|`` of their group.

Rounding is plain round-to-nearest (RTN). GPTQ (Frantar et al. 2022, arXiv 2210.17323), which QA-LoRA
uses for its base, chooses the codes column by column with second-order (Hessian) error feedback
from *calibration activations*; a quantizer here sees only the weight, so that is not done. The
storage format is GPTQ's (group-wise, asymmetric, act-order off: groups are consecutive columns).

Storage (buffers; ``weight_bytes()`` is their real size):

* ``qweight`` uint8: the codes of ``W`` flattened row-major, as one bit stream, most significant
  bit first -- every 8 codes fill ``N`` bytes (int4: two codes per byte, element ``2k`` in the
  high nibble; int2: four per byte; int3: eight codes in three bytes); the tail is zero-padded;
* ``scales`` ``out x in/L`` in ``scale_dtype`` (default fp16), ``zeros`` ``out x in/L`` fp32.

So ``bits_per_param = N + (bits(scale_dtype) + 32) / L`` (int4, L=32, fp16 scales: 5.5). GPT-2's
``Conv1D`` (``in x out``) is transposed to the Linear layout first. The forward dequantizes to
``compute_dtype`` (default: the input's dtype) and runs a dense matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.plugins._bnb import BnbQuantizedLinear, ComputeDtype, compute_dtype_of, linear_weight
from adapterhub.registry import AdapterhubError, ModuleInfo, ParamError, Quantizer, hookimpl, param

ScaleDtype = Literal["float16", "bfloat16", "float32"]
ZERO_DTYPE = torch.float32


# --------------------------------------------------------------------------- bit packing


def _stream_shifts(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shifts of the 8 codes inside an ``8*bits``-bit word and of its ``bits`` bytes (MSB first)."""
    code = bits * torch.arange(7, -1, -1, device=device)
    byte = 8 * torch.arange(bits - 1, -1, -1, device=device)
    return code, byte


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in ``[0, 2^bits)`` into a uint8 bit stream (8 codes -> ``bits`` bytes)."""
    flat = codes.reshape(-1)
    flat = F.pad(flat, (0, (-flat.numel()) % 8)).reshape(-1, 8)
    if 8 % bits == 0:  # whole codes per byte: stay in uint8
        per = 8 // bits
        shifts = bits * torch.arange(per - 1, -1, -1, device=flat.device, dtype=torch.uint8)
        parts = flat.to(torch.uint8).reshape(-1, per) << shifts
        return parts.sum(dim=1, dtype=torch.uint8) if per > 1 else parts.reshape(-1)
    wide = torch.int32 if 8 * bits < 32 else torch.int64
    code_shift, byte_shift = _stream_shifts(bits, flat.device)
    word = (flat.to(wide) << code_shift.to(wide)).sum(dim=1)
    return ((word.unsqueeze(1) >> byte_shift.to(wide)) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """The first ``n`` codes of a stream made by :func:`pack_codes` (uint8 or int32)."""
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        shifts = bits * torch.arange(per - 1, -1, -1, device=packed.device, dtype=torch.uint8)
        return ((packed.reshape(-1, 1) >> shifts) & mask).reshape(-1)[:n]
    wide = torch.int32 if 8 * bits < 32 else torch.int64
    code_shift, byte_shift = _stream_shifts(bits, packed.device)
    word = (packed.reshape(-1, bits).to(wide) << byte_shift.to(wide)).sum(dim=1)
    return ((word.unsqueeze(1) >> code_shift.to(wide)) & mask).reshape(-1)[:n]


# --------------------------------------------------------------------------- the quantized layer


def quantize_groups(weight: torch.Tensor, bits: int, group: int,
                    scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN min/max quantization of ``weight`` (``out x in``): ``(codes, scales, zeros)``.

    ``codes`` is int ``out x in``; ``scales`` (``scale_dtype``) and ``zeros`` (fp32) are
    ``out x in/group``. Codes are rounded against the *stored* scale, so dequantizing with the
    stored tensors is exactly what was optimised.
    """
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group, group)
    if not torch.isfinite(w).all():
        raise AdapterhubError(f"int{bits} cannot quantize a weight holding inf or nan")
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    levels = (1 << bits) - 1
    amax = torch.maximum(lo.abs(), hi.abs())
    info = torch.finfo(scale_dtype)
    scale = torch.maximum((hi - lo) / levels, amax * info.eps).clamp(min=info.tiny)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    if scale.max() > info.max:
        raise ParamError(f"int{bits}: a group's range {float((hi - lo).max()):.4g} needs a scale beyond "
                         f"{str(scale_dtype).removeprefix('torch.')}; use scale_dtype=float32",
                         param="scale_dtype")
    stored = scale.to(scale_dtype)
    s = stored.float()
    codes = torch.round((w - lo.unsqueeze(2)) / s.unsqueeze(2)).clamp_(0, levels)
    zeros = (-lo / s).to(ZERO_DTYPE)
    return codes.to(torch.uint8).reshape(out_f, in_f), stored, zeros


class IntNLinear(BnbQuantizedLinear):
    """A frozen Linear stored as group-wise asymmetric INT-N codes (see the module docstring).

    Subclasses set ``bits`` and ``quantizer``. Buffers keep their dtypes under ``.to(dtype)``; only
    the dtype :meth:`dequantize` returns follows the model.
    """

    bits: ClassVar[int] = 0

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, group: int = 32,
                 scale_dtype: torch.dtype = torch.float16, compute_dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        if group <= 0 or in_features % group:
            raise ParamError(f"{self.quantizer}(group={group}) needs group to divide in_features, but this "
                             f"layer has in_features={in_features}", param="group")
        super().__init__(in_features, out_features, bias, weight.dtype, compute_dtype)
        self.group = int(group)
        codes, scales, zeros = quantize_groups(weight, self.bits, self.group, scale_dtype)
        self.register_buffer("qweight", pack_codes(codes, self.bits))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    @property
    def scale_dtype(self) -> str:
        """The scales' storage dtype as the ``scale_dtype`` parameter writes it (``float16``)."""
        return str(self.scales.dtype).removeprefix("torch.")

    def codes(self) -> torch.Tensor:
        """The integer codes as uint8 ``out x in``."""
        n = self.out_features * self.in_features
        return unpack_codes(self.qweight, self.bits, n).to(torch.uint8).reshape(self.out_features, self.in_features)

    def dequantize(self) -> torch.Tensor:
        """``W~ = scale * (q - zero)`` per (row, group), computed in fp32, as ``out x in`` in ``weight_dtype``."""
        n = self.out_features * self.in_features
        q = unpack_codes(self.qweight, self.bits, n).float().reshape(self.out_features, -1, self.group)
        w = (q - self.zeros.float().unsqueeze(2)) * self.scales.float().unsqueeze(2)
        return w.reshape(self.out_features, self.in_features).to(self.weight_dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group={self.group}, scale_dtype={self.scale_dtype}, "
                f"dtype={str(self.weight_dtype).removeprefix('torch.')}")


class Int4Linear(IntNLinear):
    quantizer = "int4"
    bits = 4


class Int3Linear(IntNLinear):
    quantizer = "int3"
    bits = 3


class Int2Linear(IntNLinear):
    quantizer = "int2"
    bits = 2


# --------------------------------------------------------------------------- the quantizers


@dataclass(frozen=True)
class IntNParams:
    """Parameters of ``int4``, ``int3`` and ``int2``."""

    group: int = param(32, "input columns sharing one scale and zero-point (must divide in_features)",
                       positive=True)
    scale_dtype: ScaleDtype = param("float16", "storage dtype of the per-group scales (zero-points are fp32)")
    compute_dtype: ComputeDtype = param("auto", "dtype of the dequantized matmul (auto: the input's)")


class IntNQuantizer(Quantizer):
    """Group-wise INT-N round-to-nearest; subclasses set ``name`` and ``Linear``."""

    Params = IntNParams
    Linear: ClassVar[type[IntNLinear]]
    paper = ("Xu et al., QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models, 2023, "
             "arXiv 2309.14717; storage layout of GPTQ (Frantar et al. 2022, arXiv 2210.17323), RTN rounding")

    def bits_per_param(self, params: IntNParams) -> float:
        """``N + (bits of one scale + 32 bits of one zero-point) / group``."""
        scale_bits = torch.finfo(getattr(torch, params.scale_dtype)).bits
        return self.Linear.bits + (scale_bits + torch.finfo(ZERO_DTYPE).bits) / params.group

    def allocate(self, params: IntNParams, modules: list[tuple[ModuleInfo, Any]]) -> None:
        """Plan-time check that ``group`` divides every module's ``in_features``; no per-module
        parameters are chosen (the weights are never loaded)."""
        for info, _ in modules:
            if info.in_features is not None and info.in_features % params.group:
                raise ParamError(f"{self.name}(group={params.group}) cannot quantize module '{info.name}': "
                                 f"group must divide its in_features ({info.in_features})", param="group")
        return None

    def quantize(self, module: nn.Module, params: IntNParams) -> IntNLinear:
        weight, bias = linear_weight(module, self.name)
        return self.Linear(weight, bias, group=params.group, scale_dtype=getattr(torch, params.scale_dtype),
                           compute_dtype=compute_dtype_of(params.compute_dtype))


class Int4Quantizer(IntNQuantizer):
    name = "int4"
    Linear = Int4Linear
    summary = "group-wise asymmetric 4-bit integer weights (GPTQ layout, round-to-nearest), float zero-points"


class Int3Quantizer(IntNQuantizer):
    name = "int3"
    Linear = Int3Linear
    summary = "group-wise asymmetric 3-bit integer weights (GPTQ layout, round-to-nearest), float zero-points"


class Int2Quantizer(IntNQuantizer):
    name = "int2"
    Linear = Int2Linear
    summary = "group-wise asymmetric 2-bit integer weights (GPTQ layout, round-to-nearest), float zero-points"


INTN_QUANTIZERS = {q.name: q for q in (Int4Quantizer, Int3Quantizer, Int2Quantizer)}


@hookimpl
def register_quantizers(register):
    for quantizer in INTN_QUANTIZERS.values():
        register(quantizer)
