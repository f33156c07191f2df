"""int4 / int3 / int2: group-wise asymmetric RTN, checked against a decoder written here from the format.

The reference never calls plugins/intn.py's unpacker: it expands ``qweight`` into single bits
(most significant first), reads ``N`` bits per code, and applies ``scale * (q - zero)`` per
(row, group of ``L`` consecutive inputs).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins.intn import Int2Linear, Int3Linear, Int4Linear, IntNLinear
from adapterhub.registry import ModuleTypeError, ParamError, QuantizedLinear, bind, get_registry

BITS = {"int4": 4, "int3": 3, "int2": 2}
# (out, in, group): awkward widths included -- in 96 with group 32, in 64 with one group, odd sizes
SHAPES = [(8, 96, 32), (16, 64, 64), (5, 40, 8), (3, 15, 5), (7, 96, 96), (64, 128, 32)]


def quantize(name: str, module: nn.Module, **params) -> IntNLinear:
    q = get_registry().quantizers[name]
    return q.quantize(module, bind(q.Params, params, owner=name))


def linear_with(weight: torch.Tensor, bias: bool = True) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def reference_codes(q: IntNLinear, bits: int) -> torch.Tensor:
    stream = q.qweight.reshape(-1).to(torch.int64)
    bit_list = ((stream.unsqueeze(1) >> torch.arange(7, -1, -1)) & 1).reshape(-1)
    n = q.out_features * q.in_features
    weights = 2 ** torch.arange(bits - 1, -1, -1)
    codes = (bit_list[: n * bits].reshape(n, bits) * weights).sum(1)
    return codes.reshape(q.out_features, q.in_features)


def reference_dequant(q: IntNLinear, bits: int) -> torch.Tensor:
    codes = reference_codes(q, bits).float()
    group_of = torch.arange(q.in_features) // q.group
    scale = q.scales.float()[:, group_of]
    zero = q.zeros.float()[:, group_of]
    return scale * (codes - zero)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(BITS))
def test_dequantize_matches_reference_decode(name, shape):
    out_f, in_f, group = shape
    torch.manual_seed(out_f * in_f + group)
    w = torch.randn(out_f, in_f)
    q = quantize(name, linear_with(w), group=group)
    bits = BITS[name]
    assert isinstance(q, QuantizedLinear) and q.bits == bits and q.quantizer == name
    assert q.scales.shape == q.zeros.shape == (out_f, in_f // group)
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float32
    assert q.qweight.dtype == torch.uint8 and q.qweight.numel() == math.ceil(out_f * in_f / 8) * bits
    codes = reference_codes(q, bits)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    torch.testing.assert_close(q.dequantize(), reference_dequant(q, bits), rtol=0, atol=1e-6)
    torch.testing.assert_close(q.codes().long(), codes, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(BITS))
def test_codes_are_round_to_nearest_and_scales_span_min_max(name):
    torch.manual_seed(1)
    bits, group = BITS[name], 16
    w = torch.randn(12, 64)
    q = quantize(name, linear_with(w), group=group, scale_dtype="float32")
    levels = 2 ** bits - 1
    groups = w.reshape(12, -1, group)
    lo, hi = groups.amin(2), groups.amax(2)
    torch.testing.assert_close(q.scales, (hi - lo) / levels, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.zeros, -lo / q.scales, rtol=1e-6, atol=1e-6)
    exact = w.reshape(12, -1, group) / q.scales.unsqueeze(2) + q.zeros.unsqueeze(2)
    codes = reference_codes(q, bits).reshape(12, -1, group).float()
    assert torch.all((exact - codes).abs() <= 0.5 + 1e-4)
    # the group's min and max are represented (codes 0 and 2^N - 1), error <= scale / 2
    assert torch.all(codes.amin(2) == 0) and torch.all(codes.amax(2) == levels)
    err = (q.dequantize() - w).abs().reshape(12, -1, group)
    assert torch.all(err <= q.scales.unsqueeze(2) / 2 + 1e-6)


def test_error_falls_with_bits():
    torch.manual_seed(2)
    w = torch.randn(64, 128)
    errs = {name: rel_err(quantize(name, linear_with(w), group=32).dequantize(), w) for name in BITS}
    assert errs["int2"] > errs["int3"] > errs["int4"]
    assert errs["int4"] < 0.1 and errs["int2"] < 0.5
    # smaller groups fit tighter ranges
    assert rel_err(quantize("int4", linear_with(w), group=16).dequantize(), w) < errs["int4"]


@pytest.mark.parametrize("name", list(BITS))
@pytest.mark.parametrize("group, scale_dtype", [(32, "float16"), (64, "float32"), (16, "bfloat16")])
def test_weight_bytes_match_formula(name, group, scale_dtype):
    out_f, in_f = 48, 128  # out * in divisible by 8: no padding codes
    q = quantize(name, linear_with(torch.randn(out_f, in_f)), group=group, scale_dtype=scale_dtype)
    scale_bytes = {"float16": 2, "bfloat16": 2, "float32": 4}[scale_dtype]
    n, groups = out_f * in_f, out_f * in_f // group
    assert q.weight_bytes() == n * BITS[name] // 8 + groups * (scale_bytes + 4)
    quantizer = get_registry().quantizers[name]
    bits = quantizer.bits_per_param(bind(quantizer.Params, {"group": group, "scale_dtype": scale_dtype},
                                         owner=name))
    assert bits == BITS[name] + (8 * scale_bytes + 32) / group
    assert 8 * q.weight_bytes() / n == pytest.approx(bits, rel=1e-12)


def test_int4_default_bits_and_packing_layout():
    quantizer = get_registry().quantizers["int4"]
    assert quantizer.bits_per_param(quantizer.Params()) == 4 + 48 / 32
    w = torch.zeros(1, 8)
    w[0, 0], w[0, 1] = 1.0, -1.0  # group of 8: lo = -1 -> code 0; hi = 1 -> code 15; zeros -> code 8 (7.5 rounds even)
    q = quantize("int4", linear_with(w), group=8, scale_dtype="float32")
    assert q.qweight.tolist()[0] == 0xF0  # element 0 in the high nibble
    q2 = quantize("int2", linear_with(w), group=8, scale_dtype="float32")
    assert q2.qweight.numel() == 2 and q2.qweight.tolist()[0] >> 6 == 3 and (q2.qweight.tolist()[0] >> 4) & 3 == 0
    q3 = quantize("int3", linear_with(w), group=8, scale_dtype="float32")
    assert q3.qweight.numel() == 3 and q3.qweight.tolist()[0] >> 5 == 7


def test_constant_and_zero_groups_are_exact():
    w = torch.randn(4, 32)
    w[1] = 0.0
    w[2, :16] = 0.37
    w[3, 16:] = -5.0
    for name in BITS:
        q = quantize(name, linear_with(w), group=16)
        deq = q.dequantize()
        assert torch.isfinite(deq).all() and torch.isfinite(q.zeros).all()
        assert torch.equal(deq[1], torch.zeros(32))
        torch.testing.assert_close(deq[2, :16], w[2, :16], rtol=1e-6, atol=0)
        torch.testing.assert_close(deq[3, 16:], w[3, 16:], rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", list(BITS))
def test_forward_is_dense_matmul_of_dequantized(name):
    torch.manual_seed(4)
    lin = nn.Linear(96, 32)
    q = quantize(name, lin)
    x = torch.randn(5, 96, requires_grad=True)
    y = q(x)
    torch.testing.assert_close(y, x @ q.dequantize().t() + lin.bias, rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad is not None and list(q.parameters()) == [q.bias] and not q.bias.requires_grad


def test_conv1d_is_transposed_first():
    torch.manual_seed(5)
    conv = Conv1D(nf=24, nx=64)  # weight stored in x out = 64 x 24
    with torch.no_grad():
        conv.weight.normal_()
        conv.bias.normal_()
    q = quantize("int4", conv, group=32)
    assert (q.in_features, q.out_features, q.scales.shape) == (64, 24, (24, 2))
    assert rel_err(q.dequantize(), conv.weight.t()) < 0.1
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(q(x), x @ q.dequantize().t() + conv.bias, rtol=1e-5, atol=1e-5)


def test_dtype_cast_keeps_scales_and_zeros():
    q = quantize("int4", nn.Linear(64, 16), compute_dtype="float32")
    before = q.dequantize()
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float32 and q.qweight.dtype == torch.uint8
    assert q.weight_dtype == torch.bfloat16 and q.dequantize().dtype == torch.bfloat16
    torch.testing.assert_close(q.dequantize(), before.to(torch.bfloat16), rtol=0, atol=0)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert q(x).dtype == torch.bfloat16


def test_bf16_weights_and_state_dict_round_trip():
    torch.manual_seed(6)
    a = quantize("int3", nn.Linear(64, 16, dtype=torch.bfloat16), group=16)
    b = quantize("int3", nn.Linear(64, 16, dtype=torch.bfloat16), group=16)
    assert a.dequantize().dtype == torch.bfloat16
    b.load_state_dict(a.state_dict())
    assert set(a.state_dict()) == {"qweight", "scales", "zeros", "bias"}
    torch.testing.assert_close(b.dequantize(), a.dequantize(), rtol=0, atol=0)


def test_module_classes():
    assert isinstance(quantize("int4", nn.Linear(32, 8)), Int4Linear)
    assert isinstance(quantize("int3", nn.Linear(32, 8)), Int3Linear)
    assert isinstance(quantize("int2", nn.Linear(32, 8)), Int2Linear)


# --------------------------------------------------------------------------- errors and planning


def test_group_must_divide_in_features():
    with pytest.raises(ParamError, match=r"int4\(group=32\).*in_features=40") as info:
        quantize("int4", nn.Linear(40, 8))
    assert info.value.param == "group"
    with pytest.raises(ParamError, match="group"):
        bind(get_registry().quantizers["int2"].Params, {"group": 0}, owner="int2")
    with pytest.raises(ParamError, match="scale_dtype"):
        bind(get_registry().quantizers["int3"].Params, {"scale_dtype": "float64"}, owner="int3")
    with pytest.raises(ModuleTypeError, match="already quantized"):
        quantize("int4", quantize("int4", nn.Linear(32, 8)))


def test_plan_names_the_module_whose_width_the_group_does_not_divide():
    with pytest.raises(adapterhub.SurgeryError) as exc:
        adapterhub.plan("tiny-llama", "mlp.* -> freeze on int3(group=48)")
    msg = str(exc.value)
    assert "int3(group=48)" in msg and "model.layers.0.mlp.gate_proj" in msg and "(64)" in msg


def test_plan_bytes_equal_applied_weight_bytes():
    spec = "attn.* -> freeze on int4(group=32)\nmlp.* -> freeze on int2(group=64)"
    plan = adapterhub.plan("tiny-llama", spec)
    model = adapterhub.apply(build_builtin("tiny-llama"), spec)
    quantized = 0
    for e in plan.entries:
        if e.quant is not None:
            layer = model.get_submodule(e.module)
            assert isinstance(layer, IntNLinear) and layer.quantizer == e.quant
            assert e.bytes_after == layer.weight_bytes()  # no biases in Llama's projections
            quantized += 1
    assert quantized == 4 * 7


def test_lora_trains_on_an_int4_base():
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> lora(r=4) on int4(group=16)")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.base_layer, Int4Linear)
    ids = torch.randint(1, 256, (2, 8))
    model(input_ids=ids).logits.sum().backward()
    assert layer.lora_A.weight.grad is not None


def test_requantizing_merge_reads_the_parameters_from_the_module():
    from adapterhub.quant_merge import merge_quantized, quantizer_for

    q = quantize("int3", nn.Linear(64, 8), group=16, scale_dtype="float32", compute_dtype="bfloat16")
    quantizer, params = quantizer_for(nn.Module(), "x", q)
    assert quantizer.name == "int3"
    assert (params.group, params.scale_dtype, params.compute_dtype) == (16, "float32", "bfloat16")
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> lora(r=4) on int4(group=16)")
    with torch.no_grad():
        for _, layer in adapterhub.adapter_layers(model):
            layer.lora_B.weight.normal_(std=0.01)
    report = merge_quantized(model, requantize=True)
    assert {m.result for m in report.modules} == {"requantized"}
    assert type(model.model.layers[0].self_attn.q_proj) is Int4Linear
    assert model.model.layers[0].self_attn.q_proj.group == 16
