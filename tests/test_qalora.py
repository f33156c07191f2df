"""QA-LoRA beyond the shared matrix: pooling, init, the INT-N-preserving merge, merge_and_unload,
and the errors for a base that is not a group-wise intN layer.

Tolerance of "merged equals unmerged": fp32, relative 1e-5 of the output's scale (the merge only
changes ``zero`` by ``dW/scale``, so the difference is fp32 rounding, ~1e-7 relative).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins.intn import Int2Linear, Int3Linear, Int4Linear, IntNLinear
from adapterhub.plugins.qalora import QaLoraLayer
from adapterhub.registry import ModuleTypeError, bind, get_registry

SPECS = {
    "int4": "attn.* -> qalora(r=4, alpha=16) on int4(group=16)\nmlp.* -> qalora(r=8, alpha=16) on int4(group=32)",
    "int3": "attn.* -> qalora(r=4, alpha=8) on int3(group=32)",
    "int2": "mlp.* -> qalora(r=4, alpha=16) on int2(group=64)",
}
LINEARS = {"int4": Int4Linear, "int3": Int3Linear, "int2": Int2Linear}


def perturbed(spec: str, seed: int = 1) -> nn.Module:
    model = adapterhub.apply(build_builtin("tiny-llama"), spec)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapterhub.adapter_layers(model):
            layer.lora_B.weight.add_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.2)
    return model.eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def close_relative(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> bool:
    return bool(((a - b).abs().max() <= rel * b.abs().max()).item())


def intn_layer(name: str, group: int, out_f: int = 24, in_f: int = 96) -> IntNLinear:
    q = get_registry().quantizers[name]
    return q.quantize(nn.Linear(in_f, out_f), bind(q.Params, {"group": group}, owner=name))


def test_shapes_init_and_pooled_forward():
    torch.manual_seed(0)
    layer = QaLoraLayer(intn_layer("int4", 32), r=6, alpha=12)
    assert layer.lora_A.weight.shape == (6, 96 // 32) and layer.lora_B.weight.shape == (24, 6)
    assert layer.scaling == 2.0 and layer.group == 32
    bound = math.sqrt(6 / (3 + 6))  # xavier-uniform: fan_in = in/L = 3, fan_out = r = 6
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > 0.1 * bound
    assert torch.equal(layer.lora_B.weight, torch.zeros(24, 6))
    x = torch.randn(2, 7, 96)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
        layer.lora_B.weight.normal_()
        pooled = nn.AvgPool1d(32)(x.reshape(14, 1, 96)).reshape(2, 7, 3)
        want = layer.base_layer(x) + 2.0 * pooled @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_delta_weight_is_constant_within_each_group():
    layer = QaLoraLayer(intn_layer("int3", 16, in_f=64), r=4, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    delta = layer.delta_weight()
    assert delta.shape == (24, 64)
    groups = delta.reshape(24, 4, 16)
    assert torch.equal(groups, groups[:, :, :1].expand_as(groups))
    torch.testing.assert_close(groups[:, :, 0], (16 / 4) / 16 * layer.lora_B.weight @ layer.lora_A.weight)


@pytest.mark.parametrize("name", list(SPECS))
def test_merge_keeps_int_n_and_matches_unmerged(name):
    model = perturbed(SPECS[name])
    ids = torch.randint(1, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    adapted = logits(model, ids)
    layers = list(adapterhub.adapter_layers(model))
    before = {n: (lyr.base_layer.qweight.clone(), lyr.base_layer.scales.clone(), lyr.base_layer.zeros.clone(),
                  lyr.base_layer.dequantize().clone(), lyr.delta_weight().detach().clone()) for n, lyr in layers}
    adapterhub.merge(model)
    for n, lyr in layers:
        base = lyr.base_layer
        qweight, scales, zeros, deq, delta = before[n]
        assert isinstance(base, LINEARS[name]) and lyr.merged
        assert torch.equal(base.qweight, qweight) and torch.equal(base.scales, scales)  # codes untouched
        assert not torch.equal(base.zeros, zeros)
        torch.testing.assert_close(base.dequantize(), deq + delta, rtol=0, atol=1e-5)
    assert close_relative(logits(model, ids), adapted)
    adapterhub.unmerge(model)
    for n, lyr in layers:
        assert torch.equal(lyr.base_layer.zeros, before[n][2])  # bit-exact restore
    assert torch.equal(logits(model, ids), adapted)


def test_merge_and_unload_leaves_the_int4_layer_without_adapter():
    model = perturbed(SPECS["int4"])
    ids = torch.randint(1, 256, (3, 9), generator=torch.Generator().manual_seed(4))
    adapted = logits(model, ids)
    codes = {n: lyr.base_layer.qweight.clone() for n, lyr in adapterhub.adapter_layers(model)}
    adapterhub.merge_and_unload(model)
    assert not list(adapterhub.adapter_layers(model))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    for n, qweight in codes.items():
        module = model.get_submodule(n)
        assert type(module) is Int4Linear  # still INT4, the same codes
        assert torch.equal(module.qweight, qweight)
    merged = logits(model, ids)
    assert close_relative(merged, adapted), f"max diff {(merged - adapted).abs().max():.3e}"
    assert not any(p.requires_grad for p in model.parameters())


def test_merge_in_bf16_model_keeps_fp32_zero_points():
    model = perturbed(SPECS["int4"]).to(torch.bfloat16)
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.base_layer.zeros.dtype == torch.float32 and layer.base_layer.scales.dtype == torch.float16
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        want = layer.base_layer.dequantize().float() + layer.delta_weight().float()
        layer.merge()
        got = layer.base_layer.dequantize().float()
        assert layer(x).dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2)  # bf16 output rounding of both sides


def test_only_a_and_b_train_and_receive_gradients():
    model = adapterhub.apply(build_builtin("tiny-llama"), SPECS["int4"])
    ids = torch.randint(1, 256, (2, 8))
    model(input_ids=ids).logits.pow(2).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert layer.lora_A.weight.shape == (8, 128 // 32)


def test_plan_count_uses_the_quantizers_group():
    plan = adapterhub.plan("tiny-llama", SPECS["int4"])
    by_name = {e.module: e for e in plan.entries}
    q = by_name["model.layers.0.self_attn.q_proj"]  # 64 -> 64, group 16, r 4
    assert q.trainable == 4 * 64 // 16 + 4 * 64
    down = by_name["model.layers.0.mlp.down_proj"]  # 128 -> 64, group 32, r 8
    assert down.trainable == 8 * 128 // 32 + 8 * 64
    assert down.quant == "int4" and down.quant_params["group"] == 32


@pytest.mark.parametrize("spec, what", [
    ("attn.* -> qalora(r=4)", "not quantized"),
    ("attn.* -> qalora(r=4) on nf4", "quantized with nf4"),
    ("attn.* -> qalora(r=4) on int8", "quantized with int8"),
])
def test_a_base_that_is_not_group_wise_intn_is_refused(spec, what):
    with pytest.raises(adapterhub.SurgeryError) as exc:
        adapterhub.plan("tiny-llama", spec)
    msg = str(exc.value)
    assert "qalora needs a group-wise intN base: write `-> qalora(...) on int4(group=32)`" in msg
    assert what in msg and "model.layers.0.self_attn.q_proj" in msg


def test_group_not_dividing_in_features_is_a_located_error():
    with pytest.raises(adapterhub.SurgeryError) as exc:
        adapterhub.plan("tiny-llama", "mlp.down_proj -> qalora on int4(group=96)")
    msg = str(exc.value)
    assert "int4(group=96)" in msg and "mlp.down_proj" in msg and "(128)" in msg


def test_wrapping_anything_else_is_a_module_type_error():
    with pytest.raises(ModuleTypeError, match="qalora needs a group-wise intN base"):
        QaLoraLayer(nn.Linear(64, 8))
    nf4 = get_registry().quantizers["nf4"]
    with pytest.raises(ModuleTypeError, match="Nf4Linear"):
        get_registry().variants["qalora"].wrap(nf4.quantize(nn.Linear(64, 8), nf4.Params()),
                                               get_registry().variants["qalora"].Params(), None, "x")


def test_save_load_after_training_step(tmp_path):
    model = adapterhub.apply(build_builtin("tiny-llama"), SPECS["int3"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(1, 256, (2, 8))
    model(input_ids=ids).logits.pow(2).mean().backward()
    opt.step()
    model.eval()
    adapterhub.save(model, tmp_path / "b")
    fresh = adapterhub.load(build_builtin("tiny-llama"), tmp_path / "b").eval()
    assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_merge_quantized_keeps_the_int_n_layers():
    from adapterhub.quant_merge import merge_quantized

    model = perturbed(SPECS["int2"])
    report = merge_quantized(model)
    assert {m.result for m in report.modules} == {"quantized"}
    assert report.output_change < 1e-5 and report.max_change < 1e-5
    assert all(type(model.model.layers[i].mlp.up_proj) is Int2Linear for i in range(4))
