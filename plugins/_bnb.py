"""Shared bitsandbytes helpers for the ``nf4``, ``fp4`` and ``int8`` quantizers.

bitsandbytes is imported lazily (it costs seconds and planning never quantizes). Its one noisy
notice on CPU -- "Failed to load CPU gemm_4bit_forward from kernels-community ..." -- is dropped
by a logging filter that matches exactly that message; every other warning or error still shows.

4-bit storage (``Bnb4bitLinear``), for ``W`` of shape ``out x in`` flattened row-major to ``w``:

* ``qweight``  uint8 ``[ceil(n/2), 1]``: two 4-bit codes per byte, element ``2k`` in the high nibble;
* ``absmax``   one scale per block of ``blocksize`` elements (blocks may span rows):
  fp32 without double quantization, else uint8 codes of ``absmax - nested_offset`` in the
  8-bit dynamic code ``nested_quant_map``, scaled per 256 blocks by ``nested_absmax`` (fp32);
* ``quant_map`` the 16-entry codebook (fp32), ``nested_offset`` the fp32 mean of the absmaxes.

``w[i] = quant_map[code[i]] * absmax[i // blocksize]`` with, under double quantization,
``absmax[j] = nested_quant_map[absmax_code[j]] * nested_absmax[j // 256] + nested_offset``.

The weight is quantized and dequantized as a *flat, even-length* vector: bitsandbytes 0.50's CPU
``dequantize_4bit`` is wrong for 2-D shapes 32 or 96 wide, and an odd length would send it to a
``torch.compile`` fallback that recompiles per shape. Padding one zero changes neither the codes
nor the block scales (a zero never raises a block's absmax), so the stored bytes are bitsandbytes'.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from adapterhub.registry import (
    AdapterhubError,
    ModuleTypeError,
    ParamError,
    QuantizedLinear,
    Quantizer,
    module_kind,
    param,
)

_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"

ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # bitsandbytes' second-level block size under double quantization
_BNB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what bitsandbytes (de)quantizes


class _DropKernelsNotice(logging.Filter):
    """Drop only the kernels-community fallback notice of ``bitsandbytes.backends.cpu.ops``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno < logging.ERROR and str(record.msg).startswith(_KERNELS_NOTICE))


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKernelsNotice())


@cache
def bnb_functional() -> ModuleType:
    """``bitsandbytes.functional``, imported on first use (torch's own ``torch.jit.script_method``
    deprecation notices, raised by modules bitsandbytes imports, are not shown)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script_method` is deprecated",
                                category=DeprecationWarning)
        import bitsandbytes.functional as F
    return F


def compute_dtype_of(name: str) -> torch.dtype | None:
    """``"auto"`` -> None (use the input's dtype), else the torch dtype of that name."""
    return None if name == "auto" else getattr(torch, name)


def check_blocksize(blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ParamError(f"blocksize must be a power of two from 32 to 4096, got {blocksize}",
                         param="blocksize")


def linear_weight(module: nn.Module, quantizer: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``out x in`` weight and the bias of a Linear or GPT-2 Conv1D (Conv1D is transposed)."""
    kind = module_kind(module)
    if isinstance(module, QuantizedLinear):
        raise ModuleTypeError(f"quantizer {quantizer} cannot quantize a {type(module).__name__}: "
                              f"it is already quantized ({module.quantizer})")
    if kind not in ("linear", "conv1d"):
        raise ModuleTypeError(f"quantizer {quantizer} cannot quantize a {type(module).__name__} "
                              f"(it quantizes: conv1d, linear)")
    weight = module.weight.detach()
    if weight.device.type == "meta":
        raise AdapterhubError(f"quantizer {quantizer} needs real weights, but this {type(module).__name__} "
                              f"is on the meta device; load the weights before quantizing")
    if kind == "conv1d":
        weight = weight.t()
    bias = getattr(module, "bias", None)
    return weight.contiguous(), (bias.detach() if bias is not None else None)


class BnbQuantizedLinear(QuantizedLinear):
    """A :class:`QuantizedLinear` whose buffers keep their own dtypes under ``.to(dtype)``.

    ``model.to(torch.bfloat16)`` must not round the fp32 scales; it only changes the dtype that
    :meth:`dequantize` returns (``weight_dtype``). Device moves apply to every buffer as usual.
    """

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 dtype: torch.dtype, compute_dtype: torch.dtype | None):
        super().__init__(in_features, out_features, bias, compute_dtype)
        self._dtype = dtype

    @property
    def weight_dtype(self) -> torch.dtype:
        return self._dtype

    def _apply(self, fn: Any, recurse: bool = True) -> BnbQuantizedLinear:
        buffers = self._buffers
        for key, buf in list(buffers.items()):
            if buf is None:
                continue
            probe = fn(torch.empty(0, dtype=buf.dtype, device=buf.device))
            buffers[key] = fn(buf) if probe.dtype == buf.dtype else buf.to(device=probe.device)
        self._dtype = fn(torch.empty(0, dtype=self._dtype)).dtype
        self.__dict__["_buffers"] = {}
        try:
            super()._apply(fn, recurse)
        finally:
            self.__dict__["_buffers"] = buffers
        return self


class Bnb4bitLinear(BnbQuantizedLinear):
    """A frozen Linear stored as bitsandbytes 4-bit codes (see the module docstring for the layout).

    Subclasses set ``quantizer`` and ``quant_type`` (``nf4`` or ``fp4``).
    """

    quant_type: ClassVar[str] = ""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, *, blocksize: int = 64,
                 double_quant: bool = True, compute_dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, weight.dtype, compute_dtype)
        self.blocksize = blocksize
        self.double_quant = double_quant
        flat = weight.detach().reshape(-1)
        if flat.dtype not in _BNB_DTYPES:
            flat = flat.float()
        if flat.numel() % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        self._numel_padded = flat.numel()
        packed, state = bnb_functional().quantize_4bit(flat.contiguous(), blocksize=blocksize,
                                                       compress_statistics=double_quant,
                                                       quant_type=self.quant_type)
        self.register_buffer("qweight", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("quant_map", state.code.float())
        if double_quant:
            self.register_buffer("nested_absmax", state.state2.absmax)
            self.register_buffer("nested_quant_map", state.state2.code.float())
            self.register_buffer("nested_offset", state.offset.reshape(()).float())

    def _state(self, dtype: torch.dtype) -> Any:
        F = bnb_functional()
        nested = None
        offset = None
        if self.double_quant:
            nested = F.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                                  blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
            offset = self.nested_offset
        return F.QuantState(absmax=self.absmax, shape=torch.Size([self._numel_padded]), code=self.quant_map,
                            blocksize=self.blocksize, quant_type=self.quant_type, dtype=dtype,
                            offset=offset, state2=nested)

    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax of every block (reconstructed from the nested level under double quant)."""
        if not self.double_quant:
            return self.absmax.float()
        F = bnb_functional()
        nested = F.QuantState(absmax=self.nested_absmax, code=self.nested_quant_map,
                              blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return F.dequantize_blockwise(self.absmax, nested).float() + self.nested_offset

    def dequantize(self) -> torch.Tensor:
        """``W = quant_map[codes] * absmax[block]`` as ``out x in`` in ``weight_dtype``."""
        dtype = self._dtype if self._dtype in _BNB_DTYPES else torch.float32
        flat = bnb_functional().dequantize_4bit(self.qweight, self._state(dtype))
        n = self.in_features * self.out_features
        return flat.reshape(-1)[:n].reshape(self.out_features, self.in_features).to(self._dtype)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
                f"dtype={str(self._dtype).removeprefix('torch.')}")


class Int8Linear(BnbQuantizedLinear):
    """A frozen Linear stored as int8 codes with one fp32 absmax per output row (LLM.int8() weights).

    ``qweight[o, i] = round(127 * W[o, i] / scb[o])``; ``W = qweight * scb / 127``.
    """

    quantizer = "int8"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, weight.dtype, compute_dtype)
        codes, scb, _ = bnb_functional().int8_vectorwise_quant(weight.detach().float().contiguous())
        codes = torch.where((scb == 0).unsqueeze(1), torch.zeros_like(codes), codes)  # an all-zero row
        self.register_buffer("qweight", codes)
        self.register_buffer("scb", scb.float())

    def dequantize(self) -> torch.Tensor:
        """``W = qweight * scb / 127`` as ``out x in`` in ``weight_dtype``."""
        return bnb_functional().int8_vectorwise_dequant(self.qweight, self.scb).to(self._dtype)


def four_bit_bits_per_param(blocksize: int, double_quant: bool) -> float:
    """Bits per weight of 4-bit storage: ``4 + 8/b + 32/(256 b)`` with double quant, else ``4 + 32/b``."""
    if double_quant:
        return 4 + 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 4 + 32 / blocksize


@dataclass(frozen=True)
class FourBitParams:
    """Parameters of the ``nf4`` and ``fp4`` quantizers."""

    blocksize: int = param(64, "weights per absmax scale (a power of two, 32..4096)", positive=True)
    double_quant: bool = param(True, "quantize the absmax scales to 8 bits in blocks of 256 (QLoRA)")
    compute_dtype: ComputeDtype = param("auto", "dtype of the dequantized matmul (auto: the input's)")

    def __post_init__(self) -> None:
        check_blocksize(self.blocksize)


class FourBitQuantizer(Quantizer):
    """A bitsandbytes 4-bit quantizer; subclasses set ``name`` and ``Linear``."""

    Params = FourBitParams
    Linear: ClassVar[type[Bnb4bitLinear]]

    def bits_per_param(self, params: FourBitParams) -> float:
        return four_bit_bits_per_param(params.blocksize, params.double_quant)

    def quantize(self, module: nn.Module, params: FourBitParams) -> Bnb4bitLinear:
        weight, bias = linear_weight(module, self.name)
        return self.Linear(weight, bias, blocksize=params.blocksize, double_quant=params.double_quant,
                           compute_dtype=compute_dtype_of(params.compute_dtype))
