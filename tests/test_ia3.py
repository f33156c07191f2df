"""The ``ia3`` variant on Linear, GPT-2 Conv1D and a quantized (nf4) base, both sides.

Expected values are computed here from the tensors: output-side ``l ⊙ (x W0^T + b)``, input-side
``(l ⊙ x) W0^T + b`` (Conv1D: ``x W0 + b``; nf4: ``W0 = deq(W)``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins.ia3 import IA3Layer
from adapterhub.registry import ApplyContext, ModuleInfo, ModuleTypeError, ParamError, bind, get_registry

KINDS = ["linear", "conv1d", "nf4"]
SIDES = [False, True]  # feedforward


def variant():
    return get_registry().variants["ia3"]


def make_base(kind: str, dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 10, bias=bias, dtype=dtype)
    if kind == "conv1d":
        conv = Conv1D(nf=10, nx=12)  # weight: in x out = 12 x 10
        with torch.no_grad():
            conv.bias.normal_()
        return conv
    if kind == "nf4":
        q = get_registry().quantizers["nf4"]
        lin = nn.Linear(64, 32, dtype=dtype)
        with torch.no_grad():
            lin.bias.normal_()
        return q.quantize(lin, q.Params())
    raise AssertionError(kind)


def make_input(kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64 if kind == "nf4" else 12, dtype=dtype)


def wrap(base: nn.Module, **params) -> IA3Layer:
    v = variant()
    return v.wrap(base, bind(v.Params, params, owner="ia3"), ApplyContext(), "model.layer")


def randomize(layer: IA3Layer, std: float = 0.3) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        layer.ia3_l.add_(torch.randn_like(layer.ia3_l) * std)


def w_out_in(base: nn.Module, kind: str) -> torch.Tensor:
    if kind == "nf4":
        return base.dequantize()
    return base.weight.t() if kind == "conv1d" else base.weight


def reference(kind: str, base: nn.Module, x: torch.Tensor, l: torch.Tensor, feedforward: bool) -> torch.Tensor:
    w, b = w_out_in(base, kind), base.bias
    if feedforward:
        return (x * l) @ w.t() + b
    return l * (x @ w.t() + b)


# --------------------------------------------------------------------------- init, names


@pytest.mark.parametrize("feedforward", SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_init_is_ones_and_output_equals_base_exactly(kind, feedforward):
    base = make_base(kind)
    x = make_input(kind)
    expected = base(x)
    layer = wrap(base, feedforward=feedforward)
    assert torch.equal(layer.ia3_l, torch.ones_like(layer.ia3_l))
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("feedforward", SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_peft_name_and_layout(kind, feedforward):
    layer = wrap(make_base(kind), feedforward=feedforward)
    shape = (1, layer.in_features) if feedforward else (layer.out_features, 1)
    assert {k: tuple(v.shape) for k, v in layer.adapter_state_dict().items()} == {"ia3_l": shape}
    assert layer.ia3_l.dtype == torch.float32


# --------------------------------------------------------------------------- forward, delta


@pytest.mark.parametrize("feedforward", SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_independent_math(kind, feedforward):
    base = make_base(kind)
    layer = wrap(base, feedforward=feedforward)
    randomize(layer)
    x = make_input(kind)
    want = reference(kind, base, x, layer.ia3_l.detach().reshape(-1), feedforward)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("feedforward", SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_delta_weight_and_bias(kind, feedforward):
    base = make_base(kind)
    layer = wrap(base, feedforward=feedforward)
    randomize(layer)
    l = layer.ia3_l.detach().reshape(-1)
    w = w_out_in(base, kind)
    merged = w * l[None, :] if feedforward else l[:, None] * w
    expected = merged - w
    if kind == "conv1d":
        expected = expected.t()  # Conv1D stores in x out
    torch.testing.assert_close(layer.delta_weight(), expected, rtol=1e-6, atol=1e-6)
    if feedforward:
        assert layer.delta_bias() is None
    else:
        torch.testing.assert_close(layer.delta_bias(), (l - 1) * base.bias, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("feedforward", SIDES)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_scales_rows_or_columns_and_bias(kind, feedforward):
    base = make_base(kind)
    w0, b0 = w_out_in(base, kind).detach().clone(), base.bias.detach().clone()
    layer = wrap(base, feedforward=feedforward)
    randomize(layer)
    x = make_input(kind)
    unmerged = layer(x)
    delta = layer.delta_weight().detach()
    layer.merge()
    assert layer.merged
    l = layer.ia3_l.detach().reshape(-1)
    want_w = w0 * l[None, :] if feedforward else l[:, None] * w0
    torch.testing.assert_close(w_out_in(base, kind), want_w, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(base.bias, b0 if feedforward else l * b0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=0)  # read from W0, also merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("feedforward", SIDES)
def test_unmerge_is_bit_exact_even_with_zero_and_tiny_scales(dtype, feedforward):
    torch.manual_seed(3)
    base = nn.Linear(40, 24, dtype=dtype)
    with torch.no_grad():
        base.weight[0, 0] = -0.0
        base.bias.normal_()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    layer = wrap(base, feedforward=feedforward)
    with torch.no_grad():
        layer.ia3_l.copy_(1 + 0.2 * torch.randn_like(layer.ia3_l))
        flat = layer.ia3_l.view(-1)
        flat[1], flat[2], flat[3], flat[4] = 0.0, 1e-30, -1.5, 1e-6  # zero, underflow, negative, tiny
    layer.merge()
    assert not torch.equal(base.weight, w0)
    layer.unmerge()
    assert not layer.merged and not layer._merge_state
    int_type = {2: torch.int16, 4: torch.int32, 8: torch.int64}[w0.element_size()]
    assert torch.equal(base.weight.view(int_type), w0.view(int_type))  # bit for bit, -0.0 included
    assert torch.equal(base.bias.view(int_type), b0.view(int_type))


def test_merge_unmerge_twice_and_after_training_step():
    base = make_base("linear")
    w0 = base.weight.detach().clone()
    layer = wrap(base)
    randomize(layer)
    layer.merge()
    layer.merge()  # no-op
    layer.unmerge()
    layer.unmerge()  # no-op
    assert torch.equal(base.weight, w0)
    x = make_input("linear")
    layer(x).pow(2).sum().backward()
    torch.optim.SGD([layer.ia3_l], lr=0.1).step()
    y = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert torch.equal(base.weight, w0)


@pytest.mark.parametrize("feedforward", SIDES)
def test_nf4_merge_dequantizes_and_unmerge_restores_the_quantized_module(feedforward):
    base = make_base("nf4")
    deq, b0 = base.dequantize().clone(), base.bias.detach().clone()
    layer = wrap(base, feedforward=feedforward)
    randomize(layer)
    x = make_input("nf4")
    unmerged = layer(x)
    delta = layer.delta_weight().detach()
    layer.merge()
    assert isinstance(layer.base_layer, nn.Linear)
    torch.testing.assert_close(layer.base_layer.weight, deq + delta, rtol=1e-6, atol=1e-6)
    l = layer.ia3_l.detach().reshape(-1)
    torch.testing.assert_close(layer.base_layer.bias, b0 if feedforward else l * b0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=0)
    layer.unmerge()
    assert layer.base_layer is base and torch.equal(base.dequantize(), deq) and torch.equal(base.bias, b0)


def test_model_merge_round_trip_on_gpt2():
    model = adapterhub.apply(build_builtin("tiny-gpt2"), "attn.c_attn -> ia3\nmlp.c_proj -> ia3(feedforward=true)")
    for _, layer in adapterhub.adapter_layers(model):
        randomize(layer)
    model.eval()
    ids = torch.randint(1, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        out = model(input_ids=ids).logits
        adapterhub.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, out, rtol=1e-4, atol=1e-4)
        adapterhub.unmerge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# --------------------------------------------------------------------------- dtypes, training


def test_bf16_base_keeps_fp32_vector_and_bf16_output():
    base = make_base("linear", torch.bfloat16)
    for feedforward in SIDES:
        layer = wrap(base, feedforward=feedforward)
        randomize(layer)
        x = make_input("linear", torch.bfloat16)
        y = layer(x)
        assert y.dtype == torch.bfloat16 and layer.ia3_l.dtype == torch.float32
        l = layer.ia3_l.detach().reshape(-1)
        want = base((x.float() * l).to(torch.bfloat16)) if feedforward else (base(x).float() * l).to(torch.bfloat16)
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        layer.merge()
        layer.unmerge()


@pytest.mark.parametrize("feedforward", SIDES)
@pytest.mark.parametrize("kind", KINDS)
def test_only_the_vector_trains_and_count_matches_plan(kind, feedforward):
    base = make_base(kind)
    layer = wrap(base, feedforward=feedforward)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"ia3_l"}
    x = make_input(kind)
    layer(x).pow(2).sum().backward()
    assert layer.ia3_l.grad is not None and layer.ia3_l.grad.abs().sum() > 0
    info = ModuleInfo(name="m", type_name=type(base).__name__, kind="conv1d" if kind == "conv1d" else "linear",
                      in_features=layer.in_features, out_features=layer.out_features, own_params=0,
                      weight_bytes=0, dtype="float32", is_leaf=True)
    counted = variant().trainable_params(bind(variant().Params, {"feedforward": feedforward}, owner="ia3"), info)
    assert counted == (layer.in_features if feedforward else layer.out_features) == layer.ia3_l.numel()


def test_plan_counts_on_llama():
    p = adapterhub.plan("tiny-llama", "attn.{k,v}_proj -> ia3\nmlp.down_proj -> ia3(feedforward=true)")
    # 4 layers x (k 32 + v 32 + down_proj input 128)
    assert p.trainable == 4 * (32 + 32 + 128)


# --------------------------------------------------------------------------- errors


def test_unsupported_module_is_refused():
    with pytest.raises(ModuleTypeError, match=r"ia3 cannot wrap module 'model\.layer' of type Embedding"):
        wrap(nn.Embedding(10, 4))
    with pytest.raises(adapterhub.SurgeryError, match="ia3 cannot wrap"):
        adapterhub.plan("tiny-llama", "model.embed_tokens -> ia3")


def test_params_validation():
    with pytest.raises(ParamError, match="feedforward must be a bool"):
        bind(variant().Params, {"feedforward": 1}, owner="ia3")
    with pytest.raises(ParamError, match="did you mean 'feedforward'"):
        bind(variant().Params, {"feed_forward": True}, owner="ia3")


def test_meta_base_gets_meta_vector():
    layer = wrap(nn.Linear(32, 16, device="meta"), feedforward=True)
    assert layer.ia3_l.device.type == "meta" and tuple(layer.ia3_l.shape) == (1, 32)


# --------------------------------------------------------------------------- PEFT interop


@pytest.mark.parametrize("family, targets, feedforward", [
    ("tiny-llama", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    ("tiny-gpt2", ["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
])
def test_same_outputs_and_merged_weights_as_peft(family, targets, feedforward):
    """Our bundle tensors load into PEFT's IA3Model under our key names and give the same model."""
    peft = pytest.importorskip("peft")
    from adapterhub.bundle import adapter_state

    spec = {"tiny-llama": "attn.{k,v}_proj -> ia3\nmlp.down_proj -> ia3(feedforward=true)",
            "tiny-gpt2": "attn.c_attn -> ia3\nmlp.c_proj -> ia3(feedforward=true)"}[family]
    base = build_builtin(family)
    ours = adapterhub.apply(copy.deepcopy(base), spec)
    for _, layer in adapterhub.adapter_layers(ours):
        randomize(layer)
    config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward,
                            fan_in_fan_out=family == "tiny-gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, config)
    result = peft.set_peft_model_state_dict(theirs, adapter_state(ours))
    assert not result.unexpected_keys
    ours.eval()
    theirs.eval()
    ids = torch.randint(1, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        adapterhub.merge(ours)
        merged = theirs.merge_and_unload()
    ours_w = {n.replace(".base_layer", ""): p for n, p in ours.named_parameters()}
    for n, p in merged.named_parameters():
        torch.testing.assert_close(ours_w[n], p, rtol=1e-6, atol=1e-6, msg=n)
