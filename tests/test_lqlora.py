"""LQ-LoRA beyond the shared matrix: the init is the decomposition W ~= Q + L1 L2 with the scaling
respected, it beats plain quantization, the error falls with the budget, Fisher weighting, training
and merging into 16-bit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins import _nfk
from adapterhub.plugins._lq_fisher import calibration_windows, fisher_information, save_fisher
from adapterhub.plugins.lq import LqLinear, config_error_estimates
from adapterhub.plugins.lqlora import LqLoraLayer
from adapterhub.registry import ApplyContext, bind, get_registry

FIXED = "attn.* -> lqlora(r=4, alpha={alpha}) on lq(bits={bits}, B0=32)"


def weights_of(name: str) -> dict[str, torch.Tensor]:
    model = build_builtin(name)
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def effective(layer: LqLoraLayer) -> torch.Tensor:
    """deq(Q) + s B A from the layer's tensors."""
    with torch.no_grad():
        return layer.base_layer.dequantize().float() + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight


def residuals(model, weights, fisher=None) -> float:
    total = 0.0
    for name, layer in adapterhub.adapter_layers(model):
        r = (weights[name] - effective(layer)).double().square()
        total += float((r * fisher[name] if fisher is not None else r).sum())
    return total


@pytest.fixture(scope="module")
def fisher(tmp_path_factory):
    model = build_builtin("tiny-llama")
    ids = list(("Low-rank plus quantized: LQ-LoRA keeps what matters. " * 8).encode())
    values = fisher_information(model, calibration_windows(ids, 4, 24))
    return values, save_fisher(values, tmp_path_factory.mktemp("fisher") / "f.safetensors")


@pytest.mark.parametrize("alpha", [16, 2])
def test_init_is_the_decomposition_with_scaling_respected(alpha):
    w = weights_of("tiny-llama")
    model = adapterhub.apply(build_builtin("tiny-llama"), FIXED.format(alpha=alpha, bits=3))
    reference = adapterhub.apply(build_builtin("tiny-llama"), FIXED.format(alpha=16, bits=3))
    ref_layers = dict(adapterhub.adapter_layers(reference))
    for name, layer in adapterhub.adapter_layers(model):
        assert isinstance(layer.base_layer, LqLinear) and layer.scaling == alpha / 4
        err = float((w[name] - effective(layer)).double().square().sum())
        assert err == pytest.approx(layer.lq_error, rel=1e-4)
        # the same W ~= Q + L1 L2 whatever s is: A = L2 / sqrt(s), B = L1 / sqrt(s)
        assert torch.allclose(effective(layer), effective(ref_layers[name]), atol=1e-5)


@pytest.mark.parametrize("spec, bits", [("attn.* -> lqlora(r=4, alpha=16) on lq(bits=2, b0=4, B0=16)", 2),
                                        ("attn.* -> lqlora(r=4, alpha=16) on lq(bits=3, B0=32)", 3)])
def test_decomposition_beats_plain_quantization_at_the_same_config(spec, bits):
    w = weights_of("tiny-llama")
    model = adapterhub.apply(build_builtin("tiny-llama"), spec)
    for name, layer in adapterhub.adapter_layers(model):
        plain = _nfk.weighted_error(w[name] - _nfk.fake_quantize(w[name], layer.base_layer.config))
        assert layer.base_layer.config.bits == bits
        assert layer.lq_error < plain


def test_error_does_not_grow_with_iterations():
    lin = nn.Linear(48, 40)
    variant, quantizer = get_registry().variants["lqlora"], get_registry().quantizers["lq"]
    qparams = bind(quantizer.Params, {"bits": 2, "B0": 16}, owner="lq")
    errors = []
    for iters in (1, 2, 5, 100):
        params = bind(variant.Params, {"r": 4, "alpha": 8, "iters": iters}, owner="lqlora")
        layer = variant.wrap_quantized(lin, params, quantizer, qparams, ApplyContext(), "lin")
        errors.append(layer.lq_error)
        residual = (lin.weight.detach() - effective(layer)).double().square().sum()
        assert float(residual) == pytest.approx(layer.lq_error, 1e-4)
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0]


def test_nf4_base_is_bitsandbytes_and_beats_plain_nf4():
    from adapterhub.plugins.nf4 import Nf4Linear

    w = weights_of("tiny-llama")
    model = adapterhub.apply(build_builtin("tiny-llama"), "mlp.* -> lqlora(r=8, alpha=16, iters=5) on nf4")
    plain = adapterhub.apply(build_builtin("tiny-llama"), "mlp.* -> freeze on nf4")
    for name, layer in adapterhub.adapter_layers(model):
        assert isinstance(layer.base_layer, Nf4Linear)
        plain_err = float((w[name] - plain.get_submodule(name).dequantize()).double().square().sum())
        assert layer.lq_error < plain_err


def test_reconstruction_error_falls_as_the_budget_grows():
    w = weights_of("tiny-llama")
    errors = []
    for budget in (2.5, 3, 3.5, 4.5):
        spec = f"attn.* -> lqlora(r=4, alpha=16) on lq(budget={budget}, rank=4)"
        plan = adapterhub.plan("tiny-llama", spec)
        model = adapterhub.apply(build_builtin("tiny-llama"), spec, plan=plan)
        layers = dict(adapterhub.adapter_layers(model))
        n = sum(layer.in_features * layer.out_features for layer in layers.values())
        achieved = sum(layer.base_layer.config.bits_per_param * layer.in_features * layer.out_features
                       for layer in layers.values()) / n
        assert achieved <= budget
        assert all(layers[e.module].base_layer.config.bits == e.quant_params["bits"] for e in plan.entries)
        errors.append(residuals(model, w))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_fisher_weighting_lowers_the_weighted_error(fisher):
    values, path = fisher
    w = weights_of("tiny-llama")
    spec = "attn.* -> lqlora(r=4, alpha=16) on lq(bits=2, B0=64{extra})"
    plain = adapterhub.apply(build_builtin("tiny-llama"), spec.format(extra=""))
    weighted = adapterhub.apply(build_builtin("tiny-llama"), spec.format(extra=f', fisher="{path}"'))
    assert residuals(weighted, w, values) < residuals(plain, w, values)
    for name, layer in adapterhub.adapter_layers(weighted):  # lq_error is the weighted objective
        r = (w[name] - effective(layer)).double().square() * values[name]
        assert float(r.sum()) == pytest.approx(layer.lq_error, rel=1e-4)


def test_fisher_allocation_is_optimal_for_the_weighted_objective(fisher):
    values, path = fisher
    w = weights_of("tiny-llama")
    spec = "attn.* -> freeze on lq(budget=3, rank=4{extra})"
    choice = {}
    for key, extra in (("plain", ""), ("fisher", f', fisher="{path}"')):
        plan = adapterhub.plan("tiny-llama", spec.format(extra=extra))
        choice[key] = {e.module: _nfk.NfConfig(**{k: e.quant_params[k] for k in ("bits", "b0", "B0", "b1", "B1")})
                       for e in plan.entries}
    assert choice["plain"] != choice["fisher"]

    def weighted_total(configs):
        return sum(config_error_estimates(w[m], [c], 4, 1, values[m])[0] for m, c in configs.items())
    assert weighted_total(choice["fisher"]) <= weighted_total(choice["plain"]) * (1 + 1e-3)


def test_plan_errors_name_the_problem():
    with pytest.raises(adapterhub.SurgeryError, match=r"lq\(rank=64\) must equal lqlora's r=4"):
        adapterhub.plan("tiny-llama", "attn.* -> lqlora(r=4) on lq(budget=3)")
    with pytest.raises(adapterhub.SurgeryError, match="on lq"):
        adapterhub.plan("tiny-llama", "attn.* -> lqlora(r=4)")
    p = adapterhub.plan("tiny-llama", "attn.* -> lqlora(r=4) on lq(bits=4)")  # a fixed config needs no rank
    assert p.trainable == 4 * 4 * (128 + 96 + 96 + 128)  # 4 layers, r=4, q/k/v/o in + out


def test_only_a_and_b_train_and_the_base_stays_put():
    model = adapterhub.apply(build_builtin("tiny-llama"), FIXED.format(alpha=16, bits=4))
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    codes = layer.base_layer.qweight.clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert all(not b.requires_grad for b in layer.base_layer.buffers())
    opt.step()
    assert torch.equal(layer.base_layer.qweight, codes)


def test_merge_and_unload_gives_a_16bit_model():
    model = adapterhub.apply(build_builtin("tiny-llama"), FIXED.format(alpha=16, bits=3))
    with torch.no_grad():
        for _, layer in adapterhub.adapter_layers(model):
            layer.lora_A.weight.add_(0.05)
    expected = {n: effective(layer).detach() for n, layer in adapterhub.adapter_layers(model)}
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        adapterhub.merge_and_unload(model)
        after = model(input_ids=ids).logits
    assert torch.allclose(before, after, atol=1e-4)
    for name, w in expected.items():
        merged = model.get_submodule(name)
        assert type(merged) is nn.Linear and torch.allclose(merged.weight, w, atol=1e-6)


def test_bf16_model():
    model = build_builtin("tiny-llama").to(torch.bfloat16)
    adapterhub.apply(model, FIXED.format(alpha=16, bits=4))
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    assert layer.base_layer.dequantize().dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


# -- bundles: the quantized base (and lq's allocation) is saved and restored, not re-derived -----------------

BUDGET = "attn.* -> lqlora(r=4, alpha=16, iters=5) on lq(budget=3, rank=4)\nmlp.up_proj -> lqlora(r=4, alpha=8) on nf4"


def _base_buffers(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": b for n, layer in adapterhub.adapter_layers(model) for k, b in layer.base_layer.named_buffers()}


@pytest.fixture
def lq_bundle(tmp_path):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    model = adapterhub.apply(build_builtin("tiny-llama"), BUDGET)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, ids, logits, adapterhub.save(model, tmp_path / "lq")


def test_load_restores_the_saved_base_and_allocation_without_recomputing(lq_bundle, monkeypatch):
    import json

    from adapterhub.plugins import lq, lqlora

    model, ids, logits, directory = lq_bundle
    m = json.loads((directory / "adapterhub.json").read_text())
    assert m["base_quant"]["modules"] == sorted(n for n, _ in adapterhub.adapter_layers(model))

    def fail(*args, **kwargs):
        raise AssertionError("the decomposition / allocation must not run when the bundle holds the base")

    monkeypatch.setattr(lqlora, "lq_decompose", fail)
    monkeypatch.setattr(lq, "config_error_estimates", fail)
    loaded = adapterhub.load(build_builtin("tiny-llama"), directory).eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)
    want, got = _base_buffers(model), _base_buffers(loaded)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    layers = dict(adapterhub.adapter_layers(loaded))
    for name, layer in adapterhub.adapter_layers(model):
        assert layers[name].base_layer.extra_repr() == layer.base_layer.extra_repr()  # the same lq configs
        assert layers[name].lq_iterations == 0 and math.isnan(layers[name].lq_error)


def test_old_bundle_without_saved_base_reruns_the_decomposition(lq_bundle, monkeypatch):
    import json

    from adapterhub.plugins import lqlora

    model, ids, logits, directory = lq_bundle
    (directory / "base_quant.safetensors").unlink()
    m = json.loads((directory / "adapterhub.json").read_text())
    del m["base_quant"]
    (directory / "adapterhub.json").write_text(json.dumps(m))
    calls = []
    real = lqlora.lq_decompose
    monkeypatch.setattr(lqlora, "lq_decompose", lambda *a, **k: calls.append(1) or real(*a, **k))
    loaded = adapterhub.load(build_builtin("tiny-llama"), directory).eval()
    assert len(calls) == len(list(adapterhub.adapter_layers(model)))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)
