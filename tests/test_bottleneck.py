"""The ``bottleneck`` variant: y = h + W_up f(W_down h + b_down) + b_up after Linear / Conv1D / nf4.

Expected values are computed here from the tensors (never by calling the adapter's code).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.cli import build_cli
from adapterhub.models import build_builtin
from adapterhub.plugins.bottleneck import BottleneckLayer
from adapterhub.registry import (
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    NotMergeableError,
    ParamError,
    bind,
    get_registry,
)

KINDS = ["linear", "conv1d", "nf4"]
ACTS = ["relu", "gelu", "gelu_tanh", "silu", "tanh"]
TRAINABLE = {"down.weight", "down.bias", "up.weight", "up.bias"}


def variant():
    return get_registry().variants["bottleneck"]


def make_base(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 10, dtype=dtype)
    if kind == "conv1d":
        conv = Conv1D(nf=10, nx=12)  # weight: in x out = 12 x 10
        with torch.no_grad():
            conv.bias.normal_()
        return conv
    if kind == "nf4":
        q = get_registry().quantizers["nf4"]
        return q.quantize(nn.Linear(64, 32, dtype=dtype), q.Params())
    raise AssertionError(kind)


def make_input(kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64 if kind == "nf4" else 12, dtype=dtype)


def wrap(base: nn.Module, **params) -> BottleneckLayer:
    v = variant()
    return v.wrap(base, bind(v.Params, params, owner="bottleneck"), ApplyContext(), "model.layer")


def randomize(layer: BottleneckLayer) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for p in layer.trainable_parameters():
            p.normal_(std=0.5)


def f(name: str, z: torch.Tensor) -> torch.Tensor:
    return {
        "relu": lambda: z.clamp(min=0),
        "gelu": lambda: z * 0.5 * (1 + torch.erf(z / math.sqrt(2))),
        "gelu_tanh": lambda: 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3))),
        "silu": lambda: z * torch.sigmoid(z),
        "tanh": lambda: 1 - 2 / (torch.exp(2 * z) + 1),
    }[name]()


def base_out(kind: str, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if kind == "nf4":
        return x @ base.dequantize().t() + base.bias
    return x @ base.weight + base.bias if kind == "conv1d" else x @ base.weight.t() + base.bias


def out_features(kind: str) -> int:
    return 32 if kind == "nf4" else 10


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("kind", KINDS)
def test_zero_up_init_is_exactly_the_base(kind):
    base = make_base(kind)
    x = make_input(kind)
    expected = base(x)
    layer = wrap(base, size=4)
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.up.weight) == 0 and torch.count_nonzero(layer.up.bias) == 0
    assert torch.count_nonzero(layer.down.bias) == 0 and torch.count_nonzero(layer.down.weight) > 0


def test_truncated_normal_init_statistics():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(8, 1024), size=256, init_std=0.05)
    w = layer.down.weight.detach()
    assert w.abs().max().item() <= 2 * 0.05
    # a N(0, s^2) truncated at +-2s has std s * sqrt(1 - 2*2*phi(2)/(2*Phi(2)-1)) = 0.8796 s
    assert w.std().item() == pytest.approx(0.8796 * 0.05, rel=0.02)
    assert abs(w.mean().item()) < 1e-3


def test_houlsby_init_is_near_identity():
    base = make_base("linear")
    x = make_input("linear")
    layer = wrap(base, size=4, init="houlsby")
    for w in (layer.down.weight, layer.up.weight):
        assert torch.count_nonzero(w) == w.numel() and w.abs().max().item() <= 2e-2
    y, h = layer(x), base(x)
    assert not torch.equal(y, h)
    torch.testing.assert_close(y, h, rtol=0, atol=1e-3)


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_independent_math(kind, act):
    base = make_base(kind)
    layer = wrap(base, size=5, act=act)
    randomize(layer)
    x = make_input(kind)
    h = base_out(kind, base, x)
    down, up = layer.down, layer.up
    want = h + f(act, h @ down.weight.t() + down.bias) @ up.weight.t() + up.bias
    torch.testing.assert_close(layer(x), want.detach(), rtol=1e-5, atol=1e-5)


def test_bf16_base_keeps_fp32_adapter_and_bf16_output():
    base = make_base("linear", torch.bfloat16)
    layer = wrap(base, size=4, act="gelu")
    randomize(layer)
    x = make_input("linear", torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.down.weight.dtype == torch.float32
    h = base(x)
    update = layer.up(torch.nn.functional.gelu(layer.down(h.float())))
    torch.testing.assert_close(y, h + update.to(torch.bfloat16), rtol=0, atol=0)


# --------------------------------------------------------------------------- size, params


@pytest.mark.parametrize("params, size", [({}, 64), ({"size": 3}, 3), ({"reduction_factor": 2}, 5),
                                          ({"reduction_factor": 3}, 3), ({"reduction_factor": 2.5}, 4)])
def test_size_and_reduction_factor(params, size):
    layer = wrap(make_base("linear"), **params)  # out_features = 10
    assert layer.size == size
    assert tuple(layer.down.weight.shape) == (size, 10) and tuple(layer.up.weight.shape) == (10, size)


def test_size_and_reduction_factor_are_exclusive():
    with pytest.raises(ParamError, match="size or reduction_factor, not both") as exc:
        bind(variant().Params, {"size": 8, "reduction_factor": 4}, owner="bottleneck")
    assert exc.value.param == "reduction_factor"


def test_reduction_factor_leaving_nothing_names_the_module():
    with pytest.raises(ParamError, match=r"'model\.layer'.*reduction_factor=16.*10 output features"):
        wrap(make_base("linear"), reduction_factor=16)
    with pytest.raises(adapterhub.SurgeryError, match="reduction_factor=128") as exc:  # located at the action
        adapterhub.plan("tiny-llama", "attn.o_proj -> bottleneck(reduction_factor=128)")
    assert (exc.value.line, exc.value.column) == (1, 16)


@pytest.mark.parametrize("bad, match", [({"size": 0}, "size must be a positive int"),
                                        ({"act": "gelu_new"}, "did you mean 'gelu_tanh'"),
                                        ({"init": "houlsbi"}, "did you mean 'houlsby'"),
                                        ({"init_std": 0.0}, "init_std"),
                                        ({"reduction_factor": -2}, "reduction_factor"),
                                        ({"sise": 4}, "did you mean 'size'")])
def test_params_validation(bad, match):
    with pytest.raises(ParamError, match=match):
        bind(variant().Params, bad, owner="bottleneck")


# --------------------------------------------------------------------------- training, counts


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_tensors_and_count(kind):
    base = make_base(kind)
    layer = wrap(base, size=6)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == TRAINABLE
    assert set(layer.adapter_state_dict()) == TRAINABLE
    m, d = 6, out_features(kind)
    info = ModuleInfo(name="m", type_name=type(base).__name__, kind="conv1d" if kind == "conv1d" else "linear",
                      in_features=layer.in_features, out_features=d, own_params=0, weight_bytes=0,
                      dtype="float32", is_leaf=True)
    counted = variant().trainable_params(bind(variant().Params, {"size": 6}, owner="bottleneck"), info)
    assert counted == 2 * m * d + m + d == sum(p.numel() for p in layer.trainable_parameters())


def test_gradients_at_zero_up_init():
    base = make_base("linear")
    layer = wrap(base, size=4)
    x = make_input("linear").requires_grad_(True)
    layer(x).pow(2).sum().backward()
    assert layer.up.weight.grad.abs().sum() > 0 and layer.up.bias.grad.abs().sum() > 0
    assert torch.count_nonzero(layer.down.weight.grad) == 0  # W_up = 0 blocks it at the first step
    assert all(p.grad is None for p in base.parameters())
    torch.optim.SGD(layer.trainable_parameters(), lr=0.1).step()
    layer.zero_grad()
    layer(x).pow(2).sum().backward()
    assert layer.down.weight.grad.abs().sum() > 0


def test_plan_counts_houlsby_and_pfeiffer_on_llama():
    houlsby = adapterhub.plan("tiny-llama", "attn.o_proj -> bottleneck(size=8)\nmlp.down_proj -> bottleneck(size=8)")
    pfeiffer = adapterhub.plan("tiny-llama", "mlp.down_proj -> bottleneck(reduction_factor=16)")
    one = 2 * 8 * 64 + 8 + 64  # d = hidden 64
    assert houlsby.trainable == 4 * 2 * one
    assert pfeiffer.trainable == 4 * (2 * 4 * 64 + 4 + 64)


# --------------------------------------------------------------------------- not mergeable


def test_merge_raises_clearly():
    layer = wrap(make_base("linear"), size=4)
    for call in (layer.merge, layer.delta_weight):
        with pytest.raises(NotMergeableError, match="bottleneck adapters cannot be merged.*non-linear"):
            call()
    layer.unmerge()  # nothing to undo
    assert not layer.merged


def test_model_merge_raises_and_leaves_model_intact():
    model = adapterhub.apply(build_builtin("tiny-gpt2"), "mlp.c_proj -> bottleneck(size=4)")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(adapterhub.AdapterhubError, match="cannot be merged"):
        adapterhub.merge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_plugins_command_says_not_mergeable():
    runner = CliRunner()
    listing = json.loads(runner.invoke(build_cli(), ["plugins", "--json"]).output)
    entry = next(v for v in listing["variants"] if v["name"] == "bottleneck")
    assert entry["mergeable"] is False and entry["wraps"] == ["conv1d", "linear"]
    assert {p["name"] for p in entry["params"]} == {"size", "reduction_factor", "act", "init", "init_std"}
    text = runner.invoke(build_cli(), ["plugins"], env={"COLUMNS": "250"}).output
    assert "not mergeable" in text


# --------------------------------------------------------------------------- errors, meta


def test_unsupported_module_is_refused():
    with pytest.raises(ModuleTypeError, match=r"bottleneck cannot wrap module 'model\.layer' of type LayerNorm"):
        wrap(nn.LayerNorm(8))
    with pytest.raises(adapterhub.SurgeryError, match="bottleneck cannot wrap"):
        adapterhub.plan("tiny-bert", "embeddings.word_embeddings -> bottleneck(size=4)")


def test_attention_container_is_not_a_target_its_leaves_are():
    p = adapterhub.plan("tiny-llama", "layers.0.self_attn -> bottleneck(size=4)")
    assert sorted(e.module.rsplit(".", 1)[-1] for e in p.entries) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_meta_base_gets_meta_adapter():
    layer = wrap(nn.Linear(32, 16, device="meta"), size=4)
    assert layer.down.weight.device.type == "meta" and layer.up.bias.device.type == "meta"
