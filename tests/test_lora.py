"""The ``lora`` variant on Linear, GPT-2 Conv1D, Embedding and a quantized (nf4) base.

Every expected value is computed here from the tensors themselves:
Linear ``x W0^T + b + s x A^T B^T``; Conv1D ``x W0 + b + s x A^T B^T``;
Embedding ``W0[ids] + s (A^T[ids]) B^T``; nf4 ``x deq(W)^T + b + s x A^T B^T``.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapterhub.plugins.lora import LoraLayer, LoraParams
from adapterhub.registry import (
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    QuantizedLinear,
    bind,
    get_registry,
)

KINDS = ["linear", "conv1d", "embedding", "nf4"]
ATOL_MERGE = 1e-5  # merged vs unmerged output (fp32; also rtol 1e-5)
ATOL_UNMERGE = 1e-6  # weight after merge + unmerge vs the original (fp32)


def lora_variant():
    return get_registry().variants["lora"]


def make_base(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(12, 10, dtype=dtype)
    if kind == "conv1d":
        conv = Conv1D(nf=10, nx=12)  # weight: in x out = 12 x 10
        with torch.no_grad():
            conv.bias.normal_()
        return conv
    if kind == "embedding":
        return nn.Embedding(20, 6, padding_idx=0, dtype=dtype)
    if kind == "nf4":
        q = get_registry().quantizers["nf4"]
        return q.quantize(nn.Linear(64, 32, dtype=dtype), q.Params())
    raise AssertionError(kind)


def make_input(kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    torch.manual_seed(1)
    if kind == "embedding":
        return torch.tensor([[0, 3, 7, 19], [5, 5, 0, 1]])
    width = 64 if kind == "nf4" else 12
    return torch.randn(2, 3, width, dtype=dtype)


def wrap(base: nn.Module, **params) -> LoraLayer:
    v = lora_variant()
    return v.wrap(base, bind(v.Params, params, owner="lora"), ApplyContext(), "model.layer")


def factors(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r x in], B [out x r]) whatever the kind."""
    if layer.kind == "embedding":
        return layer.lora_embedding_A, layer.lora_embedding_B
    return layer.lora_A.weight, layer.lora_B.weight


def randomize(layer: LoraLayer) -> None:
    torch.manual_seed(2)
    with torch.no_grad():
        for t in factors(layer):
            t.normal_(std=0.2)


def base_out_in(base: nn.Module, kind: str) -> torch.Tensor:
    """The base weight as out x in, read independently of the adapter."""
    if kind == "nf4":
        return base.dequantize()
    return base.weight.t() if kind in ("conv1d", "embedding") else base.weight


def reference(kind: str, base: nn.Module, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, s: float):
    if kind == "embedding":
        return base.weight[x] + s * (A.t()[x] @ B.t())
    if kind == "conv1d":
        return x @ base.weight + base.bias + s * (x @ A.t() @ B.t())
    w = base.dequantize() if kind == "nf4" else base.weight
    return x @ w.t() + base.bias + s * (x @ A.t() @ B.t())


# --------------------------------------------------------------------------- init


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("kind", KINDS)
def test_init_output_equals_base_exactly(kind, init):
    base = make_base(kind)
    x = make_input(kind)
    expected = base(x)
    layer = wrap(base, r=4, alpha=16, init=init)
    assert torch.equal(layer(x), expected)
    assert torch.count_nonzero(layer.delta_weight()) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_attributes_and_tensor_names(kind):
    layer = wrap(make_base(kind), r=4, alpha=16, rslora=True)
    assert (layer.r, layer.alpha, layer.rslora) == (4, 16.0, True)
    assert layer.scaling == pytest.approx(16 / math.sqrt(4))
    names = {k: tuple(v.shape) for k, v in layer.adapter_state_dict().items()}
    i, o = layer.in_features, layer.out_features
    if kind == "embedding":
        assert names == {"lora_embedding_A": (4, i), "lora_embedding_B": (o, 4)}
    else:
        assert names == {"lora_A.weight": (4, i), "lora_B.weight": (o, 4)}


# --------------------------------------------------------------------------- forward / delta


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_forward_matches_independent_math(kind, rslora):
    base = make_base(kind)
    layer = wrap(base, r=4, alpha=6, rslora=rslora)
    randomize(layer)
    s = 6 / math.sqrt(4) if rslora else 6 / 4
    A, B = factors(layer)
    x = make_input(kind)
    torch.testing.assert_close(layer(x), reference(kind, base, x, A.detach(), B.detach(), s),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_delta_weight_in_base_layout(kind):
    base = make_base(kind)
    layer = wrap(base, r=3, alpha=5)
    randomize(layer)
    A, B = (t.detach() for t in factors(layer))
    expected = (5 / 3) * torch.einsum("or,ri->oi", B, A)
    if kind in ("conv1d", "embedding"):
        expected = expected.t()  # Conv1D stores in x out, Embedding num_embeddings x dim
    delta = layer.delta_weight()
    layout = base.dequantize() if kind == "nf4" else base.weight
    assert delta.shape == layout.shape
    torch.testing.assert_close(delta, expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unmerge(kind):
    base = make_base(kind)
    original = base_out_in(base, kind).detach().clone()
    layer = wrap(base, r=4, alpha=8)
    randomize(layer)
    x = make_input(kind)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged = layer(x)
    torch.testing.assert_close(merged, unmerged, rtol=ATOL_MERGE, atol=ATOL_MERGE)
    if kind == "nf4":
        assert isinstance(layer.base_layer, nn.Linear)  # dequantized, merged in 16/32-bit
        torch.testing.assert_close(layer.base_layer.weight, original + layer.delta_weight(),
                                   rtol=0, atol=ATOL_UNMERGE)
    layer.unmerge()
    assert not layer.merged
    if kind == "nf4":
        assert layer.base_layer is base  # the quantized base itself, bit for bit
        assert torch.equal(base.dequantize(), original)
    else:
        torch.testing.assert_close(base_out_in(base, kind), original, rtol=0, atol=ATOL_UNMERGE)
    torch.testing.assert_close(layer(x), unmerged, rtol=ATOL_MERGE, atol=ATOL_MERGE)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("kind", KINDS)
def test_only_adapter_trains_and_count_matches_plan(kind):
    base = make_base(kind)
    layer = wrap(base, r=5, alpha=5)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    expected = {"lora_embedding_A", "lora_embedding_B"} if kind == "embedding" else {
        "lora_A.weight", "lora_B.weight"}
    assert trainable == expected
    i, o = layer.in_features, layer.out_features
    info = ModuleInfo(name="m", type_name=type(base).__name__, kind="embedding" if kind == "embedding" else (
        "conv1d" if kind == "conv1d" else "linear"), in_features=i, out_features=o, own_params=0,
        weight_bytes=0, dtype="float32", is_leaf=True)
    counted = lora_variant().trainable_params(LoraParams(r=5), info)
    assert counted == 5 * (i + o) == sum(p.numel() for p in layer.trainable_parameters())


def test_qlora_training_step():
    base = make_base("nf4")
    x = make_input("nf4").requires_grad_(True)
    base_y = base(x)
    layer = wrap(base, r=8, alpha=16)
    assert torch.equal(layer(x), base_y)  # B = 0: exactly the quantized base
    assert all(not p.requires_grad for p in base.parameters())
    layer(x).pow(2).mean().backward()
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert layer.lora_A.weight.grad is not None  # zero while B = 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    opt = torch.optim.SGD(layer.trainable_parameters(), lr=0.1)
    opt.step()
    opt.zero_grad()
    layer(x).pow(2).mean().backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0
    assert layer.lora_B.weight.dtype == torch.float32


def test_qlora_on_bf16_weights():
    base = make_base("nf4", torch.bfloat16)
    layer = wrap(base, r=4, alpha=8)
    randomize(layer)
    x = make_input("nf4", torch.bfloat16).requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    update = (x.detach().float() @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()) * layer.scaling
    torch.testing.assert_close(y, base(x) + update.to(torch.bfloat16), rtol=0, atol=0)
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_bf16_base_keeps_fp32_adapter_and_bf16_output():
    base = make_base("linear", torch.bfloat16)
    layer = wrap(base, r=4, alpha=4)
    randomize(layer)
    x = make_input("linear", torch.bfloat16)
    y = layer(x)
    assert layer.lora_A.weight.dtype == torch.float32 and y.dtype == torch.bfloat16
    update = (x.float() @ layer.lora_A.weight.t() @ layer.lora_B.weight.t()) * layer.scaling
    torch.testing.assert_close(y, base(x) + update.to(torch.bfloat16), rtol=0, atol=0)


def test_dropout_only_on_lora_branch():
    base = make_base("linear")
    layer = wrap(base, r=4, alpha=4, dropout=0.5)
    x = make_input("linear")
    layer.train()
    assert torch.equal(layer(x), base(x))  # B = 0: dropout never touches the base path
    randomize(layer)
    A, B = (t.detach() for t in factors(layer))
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    dropped = F.dropout(x, p=0.5, training=True)  # same RNG draw as the layer's dropout
    torch.testing.assert_close(y, base(x) + dropped @ A.t() @ B.t(), rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(layer(x), reference("linear", base, x, A, B, 1.0), rtol=1e-5, atol=1e-5)


def test_embedding_padding_row_gets_no_gradient():
    layer = wrap(make_base("embedding"), r=4, alpha=4)
    randomize(layer)
    layer(make_input("embedding")).sum().backward()
    grad = layer.lora_embedding_A.grad
    assert torch.count_nonzero(grad[:, 0]) == 0  # padding_idx = 0, as in the base lookup
    assert torch.count_nonzero(grad[:, 3]) > 0


# --------------------------------------------------------------------------- init statistics


def test_gaussian_init_statistics():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(4096, 8), r=4, init="gaussian")
    A = layer.lora_A.weight.detach()
    assert abs(A.mean().item()) < 0.01
    assert A.std().item() == pytest.approx(1 / 4, rel=0.03)  # PEFT: normal_(std=1/r)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_kaiming_init_bounds():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(1024, 8), r=8)
    A = layer.lora_A.weight.detach()
    bound = 1 / math.sqrt(1024)  # kaiming_uniform(a=sqrt 5) = U(-1/sqrt(in), 1/sqrt(in))
    assert A.abs().max().item() <= bound
    assert A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)


def test_embedding_init_a_zero_b_normal():
    layer = wrap(nn.Embedding(500, 64), r=8)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0
    assert layer.lora_embedding_B.std().item() == pytest.approx(1.0, rel=0.1)


# --------------------------------------------------------------------------- errors, meta


def test_unsupported_module_is_refused():
    info = ModuleInfo(name="model.norm", type_name="LayerNorm", kind="other", in_features=None,
                      out_features=None, own_params=16, weight_bytes=64, dtype="float32", is_leaf=True)
    with pytest.raises(ModuleTypeError, match=r"model\.norm.*LayerNorm"):
        lora_variant().check_module(info)
    with pytest.raises(ModuleTypeError, match=r"model\.layer.*LayerNorm"):
        wrap(nn.LayerNorm(8))


def test_params_validation():
    v = lora_variant()
    assert bind(v.Params, {"alpha": 16}, owner="lora").alpha == 16.0
    with pytest.raises(ParamError, match="r must be a positive int"):
        bind(v.Params, {"r": 0}, owner="lora")
    with pytest.raises(ParamError, match="dropout"):
        bind(v.Params, {"dropout": 1.0}, owner="lora")
    with pytest.raises(ParamError, match="did you mean 'gaussian'"):
        bind(v.Params, {"init": "gausian"}, owner="lora")
    with pytest.raises(ParamError, match="did you mean 'alpha'"):
        bind(v.Params, {"alpah": 1}, owner="lora")


def test_meta_base_gets_meta_adapter():
    layer = wrap(nn.Linear(32, 16, device="meta"), r=4)
    assert layer.lora_A.weight.device.type == "meta" and layer.lora_B.weight.device.type == "meta"
    emb = wrap(nn.Embedding(10, 4, device="meta"), r=2)
    assert emb.lora_embedding_A.device.type == "meta"


def test_quantized_base_is_linear_kind():
    layer = wrap(make_base("nf4"), r=2)
    assert layer.kind == "linear" and layer.is_quantized
    assert isinstance(layer.base_layer, QuantizedLinear)


@pytest.mark.parametrize("rslora", [False, True])
def test_same_outputs_and_deltas_as_peft(rslora):
    """Cross-check with PEFT's own LoRA layers loaded with our tensors under our key names."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 12, padding_idx=0)
            self.proj = nn.Linear(12, 10)
            self.c_fc = Conv1D(nf=8, nx=10)

        def forward(self, ids):
            return self.c_fc(self.proj(self.emb(ids)))

    torch.manual_seed(0)
    net = Net()
    ours = {n: wrap(getattr(net, n), r=4, alpha=6, rslora=rslora) for n in ("emb", "proj", "c_fc")}
    for layer in ours.values():
        randomize(layer)
    config = peft.LoraConfig(r=4, lora_alpha=6, use_rslora=rslora, target_modules=["emb", "proj", "c_fc"],
                             fan_in_fan_out=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT notes that Conv1D needs fan_in_fan_out and sets it
        theirs = peft.get_peft_model(copy.deepcopy(net), config)
    state = {}
    for n, layer in ours.items():
        for k, v in layer.adapter_state_dict().items():
            state[f"base_model.model.{n}.{k}"] = v
    result = peft.set_peft_model_state_dict(theirs, state)  # our keys are PEFT's on-disk names
    assert not result.unexpected_keys
    for n, layer in ours.items():
        peft_layer = getattr(theirs.base_model.model, n)
        assert peft_layer.scaling["default"] == pytest.approx(layer.scaling)
        torch.testing.assert_close(peft_layer.get_delta_weight("default"), layer.delta_weight(),
                                   rtol=1e-6, atol=1e-6)
    for n, layer in ours.items():
        setattr(net, n, layer)
    ids = make_input("embedding")
    torch.testing.assert_close(net(ids), theirs(ids), rtol=1e-5, atol=1e-5)
