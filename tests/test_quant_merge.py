"""merge_quantized: 16-bit merges are exact, requantized ones carry the quantizer's error, reported."""

from __future__ import annotations

import io
import json

import pytest
import torch
from rich.console import Console
from torch import nn

import adapterhub
from adapterhub.plugins.int8 import Int8Linear
from adapterhub.plugins.nf4 import Nf4Linear
from adapterhub.quant_merge import merge_quantized, print_merge_report
from adapterhub.registry import AdapterLayer, NotMergeableError, QuantizedLinear, bind, get_registry

SPEC = "attn.* -> lora(r=4)\nmlp.* -> lora(r=4) on nf4\n"


def adapted(spec: str = SPEC, model: nn.Module | None = None) -> nn.Module:
    model = adapterhub.apply(model or adapterhub.build_builtin("tiny-llama"), spec)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_16bit_merge_is_exact_and_unloads_the_adapters(ids):
    model = adapted()
    before = logits(model, ids)
    report = merge_quantized(model, probe=ids)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())
    assert "adapterhub" not in model.__dict__
    assert report.probe_shape == list(ids.shape) and not report.requantize
    assert len(report.modules) == 28
    assert all(m.result == "dense" and m.relative_change < 1e-5 for m in report.modules)
    assert {m.quant for m in report.modules} == {None, "nf4"}
    assert report.output_change < 1e-5
    assert rel(logits(model, ids), before) < 1e-5
    json.dumps(report.to_json())


def test_requantize_keeps_nf4_with_the_same_parameters_and_reports_its_error(ids):
    spec = "attn.* -> lora(r=4)\nmlp.* -> lora(r=4) on nf4(blocksize=128, double_quant=false)\n"
    model = adapted(spec)
    before = logits(model, ids)
    layer = model.model.layers[2].mlp.up_proj
    w16 = layer.base_layer.dequantize() + layer.delta_weight().detach()
    report = merge_quantized(model, requantize=True, probe=ids)
    assert not any(isinstance(m, AdapterLayer) for m in model.modules())
    merged = model.model.layers[2].mlp.up_proj
    assert isinstance(merged, Nf4Linear) and merged.blocksize == 128 and not merged.double_quant
    assert sum(isinstance(m, Nf4Linear) for m in model.modules()) == 12
    # requantizing is the nf4 quantizer applied to deq(Q) + s B A
    q = get_registry().quantizers["nf4"]
    lin = nn.Linear(64, 128, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w16)
    expected = q.quantize(lin, bind(q.Params, {"blocksize": 128, "double_quant": False}, owner="nf4"))
    assert torch.equal(merged.qweight, expected.qweight) and torch.equal(merged.absmax, expected.absmax)
    by_name = {m.module: m for m in report.modules}
    for name, m in by_name.items():
        if ".mlp." in name:
            assert m.quant == "nf4" and m.result == "requantized" and 0 < m.relative_change < 0.2
        else:
            assert m.quant is None and m.result == "dense" and m.relative_change < 1e-5
    assert 0 < report.output_change < 0.2
    assert report.output_change == pytest.approx(rel(logits(model, ids), before), rel=1e-6)
    assert report.max_change == max(m.relative_change for m in report.modules)


def test_parameters_come_from_the_module_when_there_is_no_plan(ids):
    with_plan = adapted()
    merge_quantized(with_plan, requantize=True, probe=ids)
    without = adapted()
    without.__dict__.pop("adapterhub")
    merge_quantized(without, requantize=True, probe=ids)
    a, b = with_plan.model.layers[0].mlp.down_proj, without.model.layers[0].mlp.down_proj
    assert isinstance(b, Nf4Linear) and b.double_quant and b.blocksize == 64
    assert torch.equal(a.qweight, b.qweight) and torch.equal(a.absmax, b.absmax)


def test_int8_requantize():
    model = adapted("mlp.* -> lora(r=4) on int8(compute_dtype=float32)\n")
    report = merge_quantized(model, requantize=True)  # default probe: random token ids
    assert report.probe_shape == [2, 32]
    merged = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(merged) == 12 and all(m.compute_dtype == torch.float32 for m in merged)
    assert all(0 < m.relative_change < 0.02 for m in report.modules)


def test_bf16_base_keeps_its_dtype_when_merged_to_16_bit(ids):
    model = adapted(model=adapterhub.build_builtin("tiny-llama").to(torch.bfloat16))
    report = merge_quantized(model, probe=ids)
    up = model.model.layers[0].mlp.up_proj
    assert type(up) is nn.Linear and up.weight.dtype == torch.bfloat16
    assert report.output_change < 0.02  # bf16 rounding of the merged weight


def test_unmergeable_adapter_changes_nothing(ids):
    model = adapted("mlp.* -> lora(r=4) on nf4\nlayers -> prefix(tokens=4)\n")
    with pytest.raises(NotMergeableError, match="prefix"):
        merge_quantized(model, requantize=True)
    assert sum(isinstance(m, AdapterLayer) for m in model.modules()) == 13


def test_report_prints_as_a_table(ids):
    report = merge_quantized(adapted(), requantize=True, probe=ids)
    buf = io.StringIO()
    print_merge_report(report, Console(file=buf, width=160))
    text = buf.getvalue()
    assert "model.layers.3.mlp.down_proj" in text and "requantized" in text
    assert "model output change" in text


def test_a_variant_that_merges_into_the_quantized_form_keeps_it(ids):
    reg = get_registry()
    if "qalora" not in reg.variants or "int4" not in reg.quantizers:
        pytest.skip("needs the qalora variant and the int4 quantizer")
    model = adapted("mlp.* -> qalora(r=4) on int4(group=32)\nattn.* -> lora(r=4) on int4(group=32)\n")
    report = merge_quantized(model, requantize=True, probe=ids)
    results = {(m.variant, m.result) for m in report.modules}
    assert results == {("qalora", "quantized"), ("lora", "requantized")}
    assert all(m.relative_change < 1e-5 for m in report.modules if m.variant == "qalora")
    assert all(isinstance(m, QuantizedLinear) for n, m in model.named_modules() if n.endswith("_proj"))
