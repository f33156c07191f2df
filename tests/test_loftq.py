"""LoftQ (plugins/loftq.py): the init's approximation of W, its quantizer, and the model it starts from.

Errors are Frobenius norms ||W - (deq(Q) + s B A)||_F recomputed from the layer's own tensors.
"Non-increasing in T" allows a relative float tolerance of 1e-6 (the kept iterate is the best
so far and the runs are deterministic, so it holds exactly in practice).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins.loftq import Loftq, LoftqLayer, _as_linear, loftq_decompose, randomized_svd
from adapterhub.registry import ApplyContext, ModuleTypeError, ParamError, QuantizedLinear, bind, get_registry

TOL = 1e-6


def quantizer(name: str, **params):
    q = get_registry().quantizers[name]
    return q, bind(q.Params, params, owner=name)


def quantize_fn(name: str, **params):
    q, p = quantizer(name, **params)
    return lambda target: q.quantize(_as_linear(target, None), p)


def gaussian(out=96, inp=160, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.02


def low_rank_plus_noise(out=128, inp=96, rank=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(out, rank, generator=g), torch.randn(rank, inp, generator=g)
    return 0.02 * (u @ v) / rank ** 0.5 + 0.004 * torch.randn(out, inp, generator=g)


def q_proj():
    return build_builtin("tiny-llama").model.layers[0].self_attn.q_proj.weight.detach().clone()


MATRICES = {"gaussian": gaussian, "low_rank_plus_noise": low_rank_plus_noise, "tiny_llama_q_proj": q_proj}


@torch.no_grad()
def approx_error(w, base, lora_A, lora_B, scaling):
    return float(torch.linalg.matrix_norm(w.float() - base.dequantize().float() - scaling * lora_B @ lora_A))


def plain_error(w, name):
    return float(torch.linalg.matrix_norm(w - quantize_fn(name)(w).dequantize().float()))


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.parametrize("matrix", list(MATRICES))
def test_error_below_plain_qlora_and_non_increasing_in_iters(matrix, quant):
    w = MATRICES[matrix]()
    plain = plain_error(w, quant)
    kept = []
    for iters in (1, 2, 5):
        res = loftq_decompose(w, quantize_fn(quant), r=8, scaling=2.0, iters=iters)
        err = approx_error(w, res.base, res.lora_A, res.lora_B, 2.0)
        assert err == pytest.approx(res.errors[res.best_iter], rel=1e-5)
        assert res.errors[0] == pytest.approx(plain, rel=1e-6)
        assert err < plain
        kept.append(err)
    assert kept[1] <= kept[0] * (1 + TOL) and kept[2] <= kept[1] * (1 + TOL), kept
    assert kept[2] < kept[0]  # more steps actually help here


def test_keeps_the_best_iterate_when_a_step_makes_it_worse():
    class Dense(QuantizedLinear):
        quantizer = "dense"

        def __init__(self, w):
            super().__init__(w.shape[1], w.shape[0], None)
            self.register_buffer("w", w.clone())

        def dequantize(self):
            return self.w

    calls = []

    def quantize(target):  # a uniform grid, then an awful quantizer from the second call on
        calls.append(target)
        q = torch.round(target / 0.01) * 0.01
        return Dense(q if len(calls) == 1 else q + 0.05 * torch.randn(q.shape, generator=torch.Generator()))

    w = gaussian()
    res = loftq_decompose(w, quantize, r=8, scaling=1.0, iters=3)
    assert len(calls) == 3 and res.best_iter == 1
    assert res.errors[2] > res.errors[1] and res.errors[3] > res.errors[1]
    assert torch.equal(res.base.dequantize(), torch.round(w / 0.01) * 0.01)
    assert approx_error(w, res.base, res.lora_A, res.lora_B, 1.0) == pytest.approx(res.errors[1], rel=1e-5)


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_alpha_not_equal_r_still_approximates_w(quant):
    """alpha=32, r=8 (s=4): each factor carries 1/sqrt(s), so deq(Q) + s B A ~= W as for alpha=r.
    PEFT's assignment (B = U sqrt(S), A = sqrt(S) V^T, issue #1982) would start at deq(Q) + s U S V^T."""
    w = low_rank_plus_noise()
    plain = plain_error(w, quant)
    same = loftq_decompose(w, quantize_fn(quant), r=8, scaling=1.0, iters=3)
    res = loftq_decompose(w, quantize_fn(quant), r=8, scaling=4.0, iters=3)
    err = approx_error(w, res.base, res.lora_A, res.lora_B, 4.0)
    assert err < plain
    assert err == pytest.approx(approx_error(w, same.base, same.lora_A, same.lora_B, 1.0), rel=1e-3)
    peft_style = approx_error(w, res.base, res.lora_A * 2.0, res.lora_B * 2.0, 4.0)  # factors without 1/sqrt(s)
    assert peft_style > plain


@pytest.mark.parametrize("spec_quant, name, params", [
    ("nf4", "nf4", {}),
    ("nf4(blocksize=128, double_quant=false)", "nf4", {"blocksize": 128, "double_quant": False}),
    ("fp4", "fp4", {}),
    ("int8", "int8", {}),
])
def test_runtime_base_is_bit_identical_to_the_init_quantizer(spec_quant, name, params):
    fp32 = build_builtin("tiny-llama")
    model = adapterhub.apply(build_builtin("tiny-llama"), f"attn.* -> loftq(r=8, alpha=16, iters=3) on {spec_quant}")
    q, qp = quantizer(name, **params)
    for mod_name, layer in adapterhub.adapter_layers(model):
        assert isinstance(layer, LoftqLayer) and layer.base_layer.quantizer == name
        original = fp32.get_submodule(mod_name)
        res = loftq_decompose(original.weight.detach(), lambda t: q.quantize(_as_linear(t, None), qp), 8, 2.0, 3)
        again = q.quantize(_as_linear(res.target, None), qp)  # what the kept iterate quantized, re-quantized
        runtime = dict(layer.base_layer.named_buffers())
        for key, buf in again.named_buffers():
            assert torch.equal(runtime[key], buf), (mod_name, key)
        assert torch.equal(layer.base_layer.dequantize(), res.base.dequantize())
        assert torch.equal(layer.lora_A.weight, res.lora_A) and torch.equal(layer.lora_B.weight, res.lora_B)
        assert layer.loftq_iter == res.best_iter and layer.loftq_errors == res.errors


def test_one_step_base_equals_qlora_base():
    loftq = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> loftq(r=8, alpha=16) on nf4")
    qlora = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> lora(r=8, alpha=16) on nf4")
    qlora_layers = dict(adapterhub.adapter_layers(qlora))
    for name, layer in adapterhub.adapter_layers(loftq):
        assert torch.equal(layer.base_layer.dequantize(), qlora_layers[name].base_layer.dequantize())


def _logit_distance(spec: str, ids: torch.Tensor, reference: torch.Tensor) -> float:
    model = adapterhub.apply(build_builtin("tiny-llama"), spec).eval()
    with torch.no_grad():
        out = model(input_ids=ids).logits
    return float((out - reference).norm() / reference.norm())


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_model_starts_closer_to_fp32_than_qlora(quant, ids):
    with torch.no_grad():
        reference = build_builtin("tiny-llama").eval()(input_ids=ids).logits
    qlora = _logit_distance(f"attn.* -> lora(r=16, alpha=16) on {quant}\nmlp.* -> lora(r=16, alpha=16) on {quant}",
                            ids, reference)
    loftq = _logit_distance(f"attn.* -> loftq(r=16, alpha=16, iters=5) on {quant}\n"
                            f"mlp.* -> loftq(r=16, alpha=16, iters=5) on {quant}", ids, reference)
    print(f"relative logit distance to fp32 ({quant}): lora on {quant} {qlora:.4e}, loftq {loftq:.4e}")
    assert loftq < qlora


def test_layer_errors_match_its_tensors_and_conv1d_is_transposed():
    fp32 = build_builtin("tiny-gpt2")
    model = adapterhub.apply(build_builtin("tiny-gpt2"), "attn.* -> loftq(r=8, alpha=32, iters=2) on nf4")
    layers = list(adapterhub.adapter_layers(model))
    assert layers
    for name, layer in layers:
        w = fp32.get_submodule(name).weight.detach().t()  # Conv1D stores in x out
        assert layer.kind == "linear" and (layer.out_features, layer.in_features) == tuple(w.shape)
        err = approx_error(w, layer.base_layer, layer.lora_A.weight, layer.lora_B.weight, layer.scaling)
        assert err == pytest.approx(layer.loftq_errors[layer.loftq_iter], rel=1e-5)
        assert err < layer.loftq_errors[0] == pytest.approx(plain_error(w.contiguous(), "nf4"), rel=1e-6)
        assert torch.equal(layer.base_layer.bias, fp32.get_submodule(name).bias)


def test_randomized_svd():
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(120, 70, generator=g))
    v, _ = torch.linalg.qr(torch.randn(90, 70, generator=g))
    spectrum = 0.9 ** torch.arange(70, dtype=torch.float32)
    m = (u * spectrum) @ v.t()
    U, S, Vh = randomized_svd(m, 10)
    assert torch.allclose(S, spectrum[:10], rtol=1e-4)
    assert torch.allclose((U * S) @ Vh, (u[:, :10] * spectrum[:10]) @ v[:, :10].t(), atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip((U, S, Vh), randomized_svd(m, 10)))  # seeded: deterministic
    w = low_rank_plus_noise()
    exact = loftq_decompose(w, quantize_fn("nf4"), 8, 1.0, 2, svd="exact")
    rand = loftq_decompose(w, quantize_fn("nf4"), 8, 1.0, 2, svd="randomized")
    kept = rand.errors[rand.best_iter]
    assert kept < rand.errors[0] and kept <= exact.errors[exact.best_iter] * 1.01


def test_plan_counts_lora_params():
    p = adapterhub.plan("tiny-llama", "attn.* -> loftq(r=4, alpha=8) on nf4")
    assert p.trainable == 4 * 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64))
    assert all(e.quant == "nf4" and e.variant == "loftq" for e in p.entries)


def test_loftq_without_a_quantizer_is_a_plan_error():
    with pytest.raises(adapterhub.SurgeryError, match=r"loftq needs a quantized base.*on nf4"):
        adapterhub.plan("tiny-llama", "attn.* -> loftq(r=4)")


def test_rank_above_min_dim_is_an_error():
    with pytest.raises(adapterhub.SurgeryError, match=r"r=40 exceeds min\(in, out\)=32 of module .*k_proj"):
        adapterhub.plan("tiny-llama", "attn.* -> loftq(r=40) on nf4")


def test_already_quantized_module_is_an_error():
    q, qp = quantizer("nf4")
    model = build_builtin("tiny-llama")
    attn = model.model.layers[0].self_attn
    attn.q_proj = q.quantize(attn.q_proj, qp)
    with pytest.raises(adapterhub.SurgeryError, match="already quantized"):
        adapterhub.plan(model, "layers.0.self_attn.q_proj -> loftq(r=4) on nf4")
    with pytest.raises(ParamError, match="already quantized"):
        Loftq().wrap_quantized(attn.q_proj, Loftq.Params(r=4), q, qp, ApplyContext(), "q")


def test_quantizer_must_return_a_quantized_linear():
    class Identity:
        name = "identity"

        def quantize(self, module, params):
            return module

    with pytest.raises(ModuleTypeError, match="identity returned a Linear"):
        Loftq().wrap_quantized(nn.Linear(16, 16), Loftq.Params(r=4), Identity(), None, ApplyContext(), "x")


def test_params_and_repr():
    with pytest.raises(adapterhub.SurgeryError, match="iters"):
        adapterhub.plan("tiny-llama", "attn.* -> loftq(iters=0) on nf4")
    with pytest.raises(adapterhub.SurgeryError, match="svd"):
        adapterhub.plan("tiny-llama", "attn.* -> loftq(svd=qr) on nf4")
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.* -> loftq(r=4, dropout=0.1, rslora=true) on nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.scaling == 16 / 2 and layer.dropout == 0.1 and "kept_iter=1" in repr(layer)


# -- bundles: the quantized base is saved and restored, not re-derived -------------------------------------

BUNDLE_SPEC = "attn.* -> loftq(r=8, alpha=16, iters=3) on nf4\nmlp.up_proj -> loftq(r=4, alpha=8, iters=2) on int8"


def _trained(spec: str, ids: torch.Tensor):
    """``spec`` applied to tiny-llama, then a few optimiser steps (A and B move away from the init)."""
    model = adapterhub.apply(build_builtin("tiny-llama"), spec)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


def _base_buffers(model) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": b for n, layer in adapterhub.adapter_layers(model) for k, b in layer.base_layer.named_buffers()}


def _make_old_style(directory) -> None:
    """What a bundle saved before quantized bases were stored looks like."""
    import json

    (directory / "base_quant.safetensors").unlink()
    m = json.loads((directory / "adapterhub.json").read_text())
    del m["base_quant"]
    (directory / "adapterhub.json").write_text(json.dumps(m))


@pytest.fixture
def loftq_bundle(tmp_path, ids):
    model = _trained(BUNDLE_SPEC, ids).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return model, logits, adapterhub.save(model, tmp_path / "loftq")


def test_bundle_saves_the_quantized_base_outside_the_adapter_tensors(loftq_bundle):
    import json

    from safetensors.torch import load_file

    model, _, directory = loftq_bundle
    m = json.loads((directory / "adapterhub.json").read_text())
    names = [n for n, _ in adapterhub.adapter_layers(model)]
    assert m["base_quant"]["file"] == "base_quant.safetensors" and m["base_quant"]["modules"] == sorted(names)
    saved = load_file(str(directory / "base_quant.safetensors"))
    own = _base_buffers(model)
    assert set(saved) == {f"base_quant.{k}" for k in own}
    assert all(torch.equal(saved[f"base_quant.{k}"], b) for k, b in own.items())
    assert m["base_quant"]["bytes"] == sum(t.numel() * t.element_size() for t in saved.values())
    assert not any("base_quant" in k for k in load_file(str(directory / "adapter_model.safetensors")))


def test_load_restores_the_saved_base_without_rerunning_the_init(loftq_bundle, ids, monkeypatch):
    model, logits, directory = loftq_bundle

    def fail(*args, **kwargs):
        raise AssertionError("loftq_decompose must not run when the bundle holds the quantized base")

    monkeypatch.setattr("adapterhub.plugins.loftq.loftq_decompose", fail)
    base = build_builtin("tiny-llama")
    with torch.no_grad():  # a base that is not bit-identical: re-running the init would give other codes
        for p in base.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 1e-5)
    loaded = adapterhub.load(base, directory).eval()
    want, got = _base_buffers(model), _base_buffers(loaded)
    assert set(want) == set(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert all(type(layer) is LoftqLayer and "base=restored" in repr(layer)
               for _, layer in adapterhub.adapter_layers(loaded))
    unperturbed = adapterhub.load(build_builtin("tiny-llama"), directory).eval()
    with torch.no_grad():
        assert torch.equal(unperturbed(input_ids=ids).logits, logits)


def test_old_bundle_without_saved_base_reruns_the_init(loftq_bundle, ids, monkeypatch):
    from adapterhub.plugins import loftq as loftq_module

    model, logits, directory = loftq_bundle
    _make_old_style(directory)
    calls = []
    real = loftq_module.loftq_decompose
    monkeypatch.setattr(loftq_module, "loftq_decompose", lambda *a, **k: calls.append(1) or real(*a, **k))
    loaded = adapterhub.load(build_builtin("tiny-llama"), directory).eval()
    assert len(calls) == len(list(adapterhub.adapter_layers(model)))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, logits)
    want, got = _base_buffers(model), _base_buffers(loaded)
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_missing_or_mismatched_saved_base_is_a_clear_error(loftq_bundle):
    from safetensors.torch import load_file, save_file

    _, _, directory = loftq_bundle
    path = directory / "base_quant.safetensors"
    saved = load_file(str(path))
    key = next(k for k in saved if k.endswith("q_proj.absmax"))
    save_file({**saved, key: saved[key][:-1]}, str(path))
    with pytest.raises(adapterhub.AdapterhubError, match=r"q_proj.*absmax.*has shape"):
        adapterhub.load(build_builtin("tiny-llama"), directory)
    path.unlink()
    with pytest.raises(adapterhub.AdapterhubError, match="base_quant.safetensors is missing"):
        adapterhub.load(build_builtin("tiny-llama"), directory)
