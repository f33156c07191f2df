"""nf4 / fp4 / int8 quantizers, checked against a reference decoder written here from the format.

The reference never calls bitsandbytes: it unpacks two 4-bit codes per byte (element 2k in the
high nibble), looks them up in the code table from the QLoRA paper (NF4) or the E2M1 table (FP4),
and scales by the block absmax -- rebuilt, under double quantization, from the 8-bit codes, the
per-256-block fp32 scales and the offset.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapterhub.plugins._bnb import NESTED_BLOCKSIZE, BnbQuantizedLinear
from adapterhub.plugins.fp4 import Fp4Linear
from adapterhub.plugins.int8 import Int8Linear
from adapterhub.plugins.nf4 import Nf4Linear
from adapterhub.registry import (
    AdapterhubError,
    ModuleTypeError,
    ParamError,
    QuantizedLinear,
    bind,
    get_registry,
)

# QLoRA (arXiv 2305.14314), Appendix E / variants.md section 2: the 16 NF4 values, index 0..15.
NF4_TABLE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def fp4_table() -> list[float]:
    """FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, divided by the largest value.

    Exponent field e: 0 is subnormal (0, 1/16), e = 1, 2, 3 give 2**(4-e) * (1 + m/2); bit 3 is the sign.
    """
    values = []
    for code in range(16):
        sign = -1.0 if code & 8 else 1.0
        e, m = (code >> 1) & 3, code & 1
        magnitude = m / 16 if e == 0 else 2.0 ** (4 - e) * (1 + m / 2)
        values.append(sign * magnitude)
    top = max(abs(v) for v in values)
    return [v / top for v in values]


TABLES = {"nf4": torch.tensor(NF4_TABLE), "fp4": torch.tensor(fp4_table())}
SHAPES = [(64, 32), (64, 96), (64, 64), (16, 33), (10, 7), (3, 100), (5, 7), (2, 4096), (256, 96)]


def reg():
    return get_registry()


def quantize(name: str, module: nn.Module, **params) -> QuantizedLinear:
    q = reg().quantizers[name]
    return q.quantize(module, bind(q.Params, params, owner=name))


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def unpack_codes(qweight: torch.Tensor, n: int) -> torch.Tensor:
    b = qweight.reshape(-1).to(torch.int64)
    codes = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)  # element 2k: high nibble
    return codes[:n]


def reference_scales(q) -> torch.Tensor:
    if not q.double_quant:
        return q.absmax.float()
    idx = torch.arange(q.absmax.numel())
    return (q.nested_quant_map[q.absmax.long()] * q.nested_absmax[idx // NESTED_BLOCKSIZE]
            + q.nested_offset)


def reference_dequant(q) -> torch.Tensor:
    n = q.in_features * q.out_features
    codes = unpack_codes(q.qweight, n)
    scales = reference_scales(q)
    w = TABLES[q.quant_type][codes] * scales[torch.arange(n) // q.blocksize]
    return w.reshape(q.out_features, q.in_features)


def true_block_absmax(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = weight.float().reshape(-1)
    pad = (-flat.numel()) % blocksize
    return torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize).abs().amax(1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# --------------------------------------------------------------------------- 4-bit


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_4bit_matches_reference_decode(name, double_quant, dtype, shape):
    torch.manual_seed(sum(shape))
    w = torch.randn(*shape).to(dtype)
    q = quantize(name, linear_with(w), double_quant=double_quant)
    deq = q.dequantize()
    assert deq.shape == shape and deq.dtype == dtype
    ref = reference_dequant(q)
    torch.testing.assert_close(deq.float(), ref.to(dtype).float(), rtol=0, atol=0)
    assert rel_err(deq, w) < (0.12 if name == "nf4" else 0.15)


@pytest.mark.parametrize("shape", [(64, 32), (64, 96), (16, 33), (10, 7), (256, 96)])
@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_4bit_codes_are_nearest_and_scales_are_block_absmax(name, shape):
    torch.manual_seed(1)
    w = torch.randn(*shape)
    q = quantize(name, linear_with(w), double_quant=False, blocksize=32)
    n = w.numel()
    absmax = true_block_absmax(w, 32)
    torch.testing.assert_close(q.absmax, absmax, rtol=0, atol=0)
    scaled = w.reshape(-1) / absmax[torch.arange(n) // 32]
    table = TABLES[name]
    chosen = (scaled - table[unpack_codes(q.qweight, n)]).abs()
    best = (scaled.unsqueeze(1) - table.unsqueeze(0)).abs().amin(1)
    assert torch.all(chosen <= best + 1e-6)


def test_nibble_order_first_element_in_high_nibble():
    w = torch.zeros(1, 64)
    w[0, 0], w[0, 1] = 1.0, -1.0  # NF4 index 15 then 0
    q = quantize("nf4", linear_with(w), double_quant=False)
    assert q.qweight.reshape(-1)[0].item() == 0xF0
    assert q.qweight.reshape(-1)[1].item() == 0x77  # two exact zeros: NF4 index 7


@pytest.mark.parametrize("name", ["nf4", "fp4"])
def test_double_quant_scales_reconstruct_absmax(name):
    torch.manual_seed(2)
    w = torch.randn(300, 128) * torch.linspace(0.1, 3.0, 300).unsqueeze(1)  # 600 blocks: 3 nested blocks
    q = quantize(name, linear_with(w), double_quant=True)
    assert q.absmax.dtype == torch.uint8 and q.nested_absmax.numel() == 3
    rebuilt = reference_scales(q)
    torch.testing.assert_close(q.block_scales(), rebuilt, rtol=1e-6, atol=1e-7)
    true = true_block_absmax(w, 64)
    # the 8-bit dynamic code's error is relative to each nested block's scale max|absmax - offset|
    nested_scale = q.nested_absmax[torch.arange(true.numel()) // NESTED_BLOCKSIZE]
    assert torch.all((rebuilt - true).abs() <= 0.02 * nested_scale)
    assert torch.isclose(q.nested_offset, true.mean(), rtol=1e-5)


@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
def test_blocksizes_and_weight_bytes_match_formula(blocksize):
    torch.manual_seed(3)
    w = torch.randn(1024, 1024)  # 2**20 weights: whole blocks and whole nested blocks at every size
    n = w.numel()
    quantizer = reg().quantizers["nf4"]
    for dq in (True, False):
        q = quantize("nf4", linear_with(w), blocksize=blocksize, double_quant=dq)
        tables = sum(b.numel() * b.element_size() for k, b in q.named_buffers()
                     if k in ("quant_map", "nested_quant_map", "nested_offset"))
        bits = 8 * (q.weight_bytes() - tables) / n
        assert bits == pytest.approx(quantizer.bits_per_param(bind(quantizer.Params, {
            "blocksize": blocksize, "double_quant": dq}, owner="nf4")), rel=1e-12)
        torch.testing.assert_close(q.dequantize(), reference_dequant(q), rtol=0, atol=0)
    assert quantizer.bits_per_param(quantizer.Params()) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))
    assert quantizer.bits_per_param(quantizer.Params(double_quant=False)) == 4.5


def test_nf4_double_quant_bits_on_a_4096_layer():
    w = torch.randn(4096, 4096)
    q = quantize("nf4", linear_with(w, bias=False))
    bits = 8 * q.weight_bytes() / w.numel()
    assert 4.127 < bits < 4.128  # 4.12695 + codebooks (16 + 256 fp32) and the offset


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8"])
def test_quantized_forward_is_dense_matmul_of_dequantized(name):
    torch.manual_seed(4)
    lin = nn.Linear(96, 32)
    q = quantize(name, lin)
    assert isinstance(q, QuantizedLinear) and q.bias is not None and not q.bias.requires_grad
    x = torch.randn(5, 96, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ q.dequantize().t() + lin.bias, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert list(q.parameters()) == [q.bias]


def test_compute_dtype_and_bf16_weights():
    lin = nn.Linear(64, 16, dtype=torch.bfloat16)
    q = quantize("nf4", lin, compute_dtype="float32")
    assert q.weight_dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = q(x)
    assert y.dtype == torch.bfloat16
    ref = (x.float() @ q.dequantize().float().t() + lin.bias.float()).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_dtype_cast_keeps_scales_exact():
    torch.manual_seed(5)
    q = quantize("nf4", nn.Linear(64, 64))
    before = q.dequantize()
    q.to(torch.bfloat16)
    assert q.nested_absmax.dtype == torch.float32 and q.quant_map.dtype == torch.float32
    assert q.bias.dtype == torch.bfloat16 and q.weight_dtype == torch.bfloat16
    torch.testing.assert_close(q.dequantize(), before.to(torch.bfloat16), rtol=0, atol=0)
    q.float()
    torch.testing.assert_close(q.dequantize(), before, rtol=0, atol=0)


def test_state_dict_round_trip():
    torch.manual_seed(6)
    a = quantize("nf4", nn.Linear(33, 16))
    b = quantize("nf4", nn.Linear(33, 16))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.dequantize(), a.dequantize(), rtol=0, atol=0)
    assert {"qweight", "absmax", "quant_map", "nested_absmax", "nested_quant_map",
            "nested_offset"} <= set(a.state_dict())


@pytest.mark.parametrize("name", ["nf4", "fp4", "int8"])
def test_conv1d_becomes_linear_like(name):
    torch.manual_seed(7)
    conv = Conv1D(nf=24, nx=40)  # weight stored in x out = 40 x 24
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    q = quantize(name, conv)
    assert (q.in_features, q.out_features) == (40, 24)
    assert q.dequantize().shape == (24, 40)
    x = torch.randn(2, 3, 40)
    assert rel_err(q.dequantize(), conv.weight.t()) < (0.01 if name == "int8" else 0.15)
    torch.testing.assert_close(q(x), x @ q.dequantize().t() + conv.bias, rtol=1e-5, atol=1e-5)
    assert rel_err(q(x), conv(x)) < 0.2


def test_module_classes():
    assert isinstance(quantize("nf4", nn.Linear(8, 8)), Nf4Linear)
    assert isinstance(quantize("fp4", nn.Linear(8, 8)), Fp4Linear)
    assert isinstance(quantize("int8", nn.Linear(8, 8)), Int8Linear)
    assert issubclass(Nf4Linear, BnbQuantizedLinear)


# --------------------------------------------------------------------------- int8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 32), (7, 96), (3, 5)])
def test_int8_round_trip(shape, dtype):
    torch.manual_seed(8)
    w = torch.randn(*shape).to(dtype)
    q = quantize("int8", linear_with(w))
    assert q.qweight.dtype == torch.int8 and q.scb.dtype == torch.float32
    wf = w.float()
    scale = wf.abs().amax(1)
    torch.testing.assert_close(q.scb, scale, rtol=0, atol=0)
    codes = torch.round(wf * 127 / scale.unsqueeze(1))
    assert torch.equal(q.qweight.float(), codes)
    deq = q.dequantize()
    assert deq.dtype == dtype
    rounding = 1e-7 if dtype == torch.float32 else 1e-2  # bf16 output rounding on top of int8's
    assert torch.all((deq.float() - wf).abs() <= scale.unsqueeze(1) / 254 + rounding)
    assert rel_err(deq, w) < 0.01
    assert q.weight_bytes() == w.numel() + 4 * shape[0]


def test_int8_zero_row_and_bits():
    w = torch.randn(4, 16)
    w[2] = 0
    q = quantize("int8", linear_with(w))
    assert torch.equal(q.dequantize()[2], torch.zeros(16))
    assert torch.isfinite(q.dequantize()).all()
    quantizer = reg().quantizers["int8"]
    assert quantizer.bits_per_param(quantizer.Params(), in_features=16) == 10.0
    assert quantizer.bits_per_param(quantizer.Params()) == pytest.approx(8 + 32 / 4096)


# --------------------------------------------------------------------------- errors


def test_blocksize_validated():
    quantizer = reg().quantizers["nf4"]
    with pytest.raises(ParamError, match="blocksize") as info:
        bind(quantizer.Params, {"blocksize": 48}, owner="nf4")
    assert info.value.param == "blocksize"
    with pytest.raises(ParamError, match="compute_dtype"):
        bind(quantizer.Params, {"compute_dtype": "fp8"}, owner="nf4")


def test_meta_and_unsupported_modules_are_refused():
    with pytest.raises(AdapterhubError, match="meta"):
        quantize("nf4", nn.Linear(8, 8, device="meta"))
    with pytest.raises(ModuleTypeError, match="LayerNorm"):
        quantize("int8", nn.LayerNorm(8))
    with pytest.raises(ModuleTypeError, match="already quantized"):
        quantize("nf4", quantize("nf4", nn.Linear(8, 8)))


def test_bitsandbytes_import_is_quiet():
    import subprocess
    import sys

    code = ("import warnings; warnings.simplefilter('always')\n"
            "from adapterhub.plugins._bnb import bnb_functional\n"
            "bnb_functional().quantize_4bit\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr
    assert "script_method" not in done.stderr
