"""The ``slora`` layer and its Triton kernels (BGMV / SGMV) against an independent per-row formula.

Kernels run on CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py) on small awkward shapes:
non-power-of-two in/out, ranks 1..16 mixed in one batch, empty slots and rows with no adapter.
Expected values are computed here row by row in float64, never taken from the module.
Under ``ADAPTERHUB_TEST_TRITON_GPU=1`` the kernel tests put their tensors on CUDA (``kernel_device``)
and the layers reach the kernels through the automatic dispatch; the tolerances are the same.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adapterhub
from adapterhub.models import build_builtin
from adapterhub.plugins import slora as sl
from adapterhub.plugins.slora import SLoraLayer
from adapterhub.registry import AdapterhubError, NotMergeableError

IN, OUT, SLOTS, R = 37, 29, 6, 16
RANKS = [1, 16, 5, 0, 9, 3]  # slot 3 is empty


def filled_layer(base: nn.Module, seed: int = 0) -> tuple[SLoraLayer, list]:
    """A layer whose slots hold random adapters of RANKS; returns it and ``[(A, B, s) or None]``."""
    layer = SLoraLayer(base, slots=SLOTS, max_rank=R)
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for slot, r in enumerate(RANKS):
        if r == 0:
            adapters.append(None)
            continue
        a, b = torch.randn(r, layer.in_features, generator=g), torch.randn(layer.out_features, r, generator=g)
        s = 0.25 + slot * 0.5
        layer.write_slot(slot, a, b, s)
        adapters.append((a, b, s))
    return layer, adapters


def formula(base: nn.Module, x: torch.Tensor, slots: list[int], adapters: list) -> torch.Tensor:
    """Row by row in float64 on CPU: base(x_b) + s * x_b A^T B^T for the row's adapter (none for -1 / empty)."""
    with torch.no_grad():
        out = base(x).double().cpu()
    x = x.double().cpu()
    for row, slot in enumerate(slots):
        if slot >= 0 and adapters[slot] is not None:
            a, b, s = adapters[slot]
            out[row] += s * (x[row] @ a.double().t() @ b.double().t())
    return out


def conv1d(n_in: int, n_out: int):
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(n_out, n_in)
    nn.init.normal_(layer.weight, std=0.2)
    return layer


SLOT_ROWS = [2, -1, 0, 1, 4, 3, 2, 5, -1]


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_layer_rows_match_formula(kind, t, path, monkeypatch, request):
    device = request.getfixturevalue("kernel_device") if path == "triton" else torch.device("cpu")
    monkeypatch.setenv(sl.KERNEL_ENV, request.getfixturevalue("kernel_env") if path == "triton" else "torch")
    if path == "triton":
        pytest.importorskip("triton")
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT) if kind == "linear" else conv1d(IN, OUT)
    layer, adapters = filled_layer(base, seed=1)
    layer.to(device)  # base too: the same module object
    x = torch.randn(len(SLOT_ROWS), t, IN, generator=torch.Generator().manual_seed(2)).to(device)
    layer.set_rows(SLOT_ROWS)
    with torch.no_grad():
        got = layer(x).cpu()
    want = formula(base, x, SLOT_ROWS, adapters)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-5), f"{(got.double() - want).abs().max():.2e}"
    layer.set_rows(None)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))


def test_all_rows_active_and_two_dim_input():
    layer, adapters = filled_layer(nn.Linear(IN, OUT), seed=3)
    rows = [0, 1, 2, 4]
    layer.set_rows(rows)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(4))  # one token per row, no T dim
    with torch.no_grad():
        got = layer(x)
    assert got.shape == (4, OUT)
    assert torch.allclose(got.double(), formula(layer.base_layer, x, rows, adapters), atol=1e-4)


def test_write_clear_resize_keep_contents():
    layer, adapters = filled_layer(nn.Linear(IN, OUT), seed=5)
    layer.resize(SLOTS + 3, R + 4)  # existing slots keep their adapters
    assert layer.lora_A.shape == (SLOTS + 3, R + 4, IN) and layer.lora_B.shape == (SLOTS + 3, OUT, R + 4)
    layer.clear_slot(0)
    adapters[0] = None
    rows = [0, 1, 4, SLOTS + 2]
    layer.set_rows(rows)
    x = torch.randn(4, 3, IN, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = layer(x)
    assert torch.allclose(got.double(), formula(layer.base_layer, x, rows, adapters + [None] * 3), atol=1e-4)
    # a lower-rank adapter written over a higher-rank one leaves no stale columns behind
    a, b = torch.ones(2, IN), torch.ones(OUT, 2)
    layer.write_slot(1, a, b, 1.0)
    assert layer.lora_A[1, 2:].abs().sum() == 0 and layer.lora_B[1, :, 2:].abs().sum() == 0
    assert int(layer.rank[1]) == 2
    with pytest.raises(ValueError, match="only grow"):
        layer.resize(2, R)
    with pytest.raises(ValueError, match="do not fit"):
        layer.write_slot(2, torch.ones(3, IN + 1), torch.ones(OUT, 3), 1.0)


def test_errors_rows_and_slots():
    layer, _ = filled_layer(nn.Linear(IN, OUT))
    with pytest.raises(AdapterhubError, match="out of range"):
        layer.set_rows([0, SLOTS])
    layer.set_rows([0, 1])
    with pytest.raises(AdapterhubError, match="3 rows but the batch was set for 2"):
        layer(torch.randn(3, 2, IN))
    with pytest.raises(NotMergeableError, match="no merge, by design"):
        layer.merge()


def test_variant_from_a_spec(tiny_gpt2):
    spec = "attn.c_attn -> slora(slots=3, max_rank=4)"
    p = adapterhub.plan(tiny_gpt2, spec)
    assert p.trainable == 0 and {e.variant for e in p.entries if e.action == "variant"} == {"slora"}
    model = adapterhub.apply(tiny_gpt2, spec)
    assert adapterhub.trainable_parameters(model) == []
    layers = [layer for _, layer in adapterhub.adapter_layers(model)]
    assert len(layers) == 4 and all(layer.lora_A.shape == (3, 4, 64) for layer in layers)
    assert len({id(layer.state) for layer in layers}) == 1  # one row map for the whole model
    ids = torch.randint(1, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = build_builtin("tiny-gpt2")(input_ids=ids).logits
        layers[0].set_rows([0, -1])  # empty slots: still the base model
        assert torch.allclose(model(input_ids=ids).logits, base, atol=1e-5)
        g = torch.Generator().manual_seed(1)
        for layer in layers:
            layer.write_slot(0, torch.randn(4, 64, generator=g), torch.randn(192, 4, generator=g), 0.5)
        got = model(input_ids=ids).logits
    assert not torch.allclose(got[0], base[0], atol=1e-3) and torch.allclose(got[1], base[1], atol=1e-5)
    with pytest.raises(NotMergeableError):
        adapterhub.merge_and_unload(model)


# --------------------------------------------------------------------------- kernels

def kernel_case(n_tokens: int, seed: int = 7, device="cpu"):
    """A, B, scaling, rank, x drawn on CPU (the same values on every device), then moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(SLOTS, R, IN)
    B = torch.zeros(SLOTS, OUT, R)
    for s, r in enumerate(RANKS):
        A[s, :r] = torch.randn(r, IN, generator=g)
        B[s, :, :r] = torch.randn(OUT, r, generator=g)
        A[s, r:] = 1e3 if r else 0.0  # padding the kernels must never read (rank masks)
    scaling = torch.rand(SLOTS, generator=g) + 0.5
    rank = torch.tensor(RANKS, dtype=torch.int32)
    x = torch.randn(n_tokens, IN, generator=g)
    return tuple(t.to(device) for t in (A, B, scaling, rank, x))


def xa_formula(x, A, scaling, ranks, token_slots, r):
    """float64 on CPU (inputs on any device)."""
    x, A, scaling = x.cpu(), A.cpu(), scaling.cpu()
    out = torch.zeros(x.shape[0], r, dtype=torch.float64)
    for n, s in enumerate(token_slots):
        if s >= 0:
            k = min(ranks[s], r)
            out[n, :k] = scaling[s].double() * (A[s, :k].double() @ x[n].double())
    return out


def test_bgmv_shrink_expand_match_formula(kernel_device):
    kern = pytest.importorskip("adapterhub.plugins._slora_kernel")
    slots = [2, -1, 0, 1, 4, 3, 5, 2, -1, 1, 0]
    A, B, scaling, rank, x = kernel_case(len(slots), device=kernel_device)
    ts = torch.tensor(slots, dtype=torch.int32, device=kernel_device)
    xa = kern.bgmv_shrink(x, A, scaling, rank, ts, R)
    want_xa = xa_formula(x, A, scaling, RANKS, slots, R)
    assert xa.dtype == torch.float32 and torch.allclose(xa.double().cpu(), want_xa, atol=1e-4, rtol=1e-5)
    y0 = torch.randn(len(slots), OUT, generator=torch.Generator().manual_seed(8)).to(kernel_device)
    y = y0.clone()
    assert kern.bgmv_expand(xa, B, rank, ts, y) is y
    B, y, y0 = B.cpu(), y.cpu(), y0.cpu()
    want = y0.double().clone()
    for n, s in enumerate(slots):
        if s >= 0:
            want[n] += B[s, :, :RANKS[s]].double() @ want_xa[n, :RANKS[s]]
    assert torch.allclose(y.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(y[1], y0[1]) and torch.equal(y[5], y0[5])  # no adapter / empty slot: untouched


def test_bgmv_batch_rank_cut_and_half_output(kernel_device):
    kern = pytest.importorskip("adapterhub.plugins._slora_kernel")
    slots = [0, 2, 5, -1]  # ranks 1, 5, 3: the batch needs only r = 5
    A, B, scaling, rank, x = kernel_case(len(slots), seed=9, device=kernel_device)
    ts = torch.tensor(slots, dtype=torch.int32, device=kernel_device)
    xa = kern.bgmv_shrink(x, A, scaling, rank, ts, 5)
    assert xa.shape == (4, 5)
    assert torch.allclose(xa.double().cpu(), xa_formula(x, A, scaling, RANKS, slots, 5), atol=1e-4)
    y0 = torch.randn(4, OUT, generator=torch.Generator().manual_seed(10)).half().to(kernel_device)
    y = y0.clone()
    kern.bgmv_expand(xa, B, rank, ts, y)
    B, xa, y, y0 = B.cpu(), xa.cpu(), y.cpu(), y0.cpu()
    want = y0.double().clone()
    for n, s in enumerate(slots):
        if s >= 0:
            want[n] += B[s, :, :5].double() @ xa[n].double()
    assert y.dtype == torch.float16 and torch.allclose(y.double(), want, atol=2e-2, rtol=2e-3)


def test_sgmv_segments_of_different_lengths(kernel_device):
    kern = pytest.importorskip("adapterhub.plugins._slora_kernel")
    # tokens sorted by adapter: segments [0,5) slot 1, [5,6) slot 0, [6,23) slot 4, [23,26) empty slot 3,
    # [26,30) slot 2; tokens 30..32 belong to no segment (no adapter)
    starts, lens, seg_slots = [0, 5, 6, 23, 26], [5, 1, 17, 3, 4], [1, 0, 4, 3, 2]
    n = 33
    A, B, scaling, rank, x = kernel_case(n, seed=11, device=kernel_device)
    token_slots = [-1] * n
    for st, ln, s in zip(starts, lens, seg_slots):
        token_slots[st:st + ln] = [s] * ln
    args = [torch.tensor(v, dtype=torch.int32, device=kernel_device) for v in (starts, lens, seg_slots)]
    xa = kern.sgmv_shrink(x, A, scaling, rank, *args, max(lens), R)
    want_xa = xa_formula(x, A, scaling, RANKS, token_slots, R)
    covered = [i for i, s in enumerate(token_slots) if s >= 0]
    assert torch.allclose(xa.cpu()[covered].double(), want_xa[covered], atol=1e-4, rtol=1e-5)
    y0 = torch.randn(n, OUT, generator=torch.Generator().manual_seed(12)).to(kernel_device)
    y = y0.clone()
    kern.sgmv_expand(xa, B, rank, *args, max(lens), y)
    B, y, y0 = B.cpu(), y.cpu(), y0.cpu()
    want = y0.double().clone()
    for i, s in enumerate(token_slots):
        if s >= 0:
            want[i] += B[s, :, :RANKS[s]].double() @ want_xa[i, :RANKS[s]]
    assert torch.allclose(y.double(), want, atol=1e-4, rtol=1e-5)
    assert torch.equal(y[30:], y0[30:]) and torch.equal(y[23:26], y0[23:26])


def test_kernels_reject_bad_shapes(kernel_device):
    kern = pytest.importorskip("adapterhub.plugins._slora_kernel")
    A, B, scaling, rank, x = kernel_case(3, device=kernel_device)
    ts = torch.zeros(3, dtype=torch.int32, device=kernel_device)
    with pytest.raises(ValueError, match="x must be"):
        kern.bgmv_shrink(x[:, :-1], A, scaling, rank, ts, 4)
    with pytest.raises(ValueError, match="rank 17"):
        kern.bgmv_shrink(x, A, scaling, rank, ts, R + 1)
    with pytest.raises(ValueError, match="y must be"):
        kern.bgmv_expand(torch.zeros(3, 4, device=kernel_device), B, rank, ts,
                         torch.zeros(3, OUT + 1, device=kernel_device))


def test_layer_dispatch_follows_env(monkeypatch, kernel_device, kernel_env):
    """ADAPTERHUB_KERNELS=triton sends the forward to the kernels (even on CPU; auto on CUDA), =torch to torch."""
    kern = pytest.importorskip("adapterhub.plugins._slora_kernel")
    calls = []
    real = kern.slora_add_
    monkeypatch.setattr(kern, "slora_add_", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer, _ = filled_layer(nn.Linear(IN, OUT))
    layer.to(kernel_device)
    layer.set_rows([1, -1])
    x = torch.randn(2, 1, IN).to(kernel_device)
    with torch.no_grad():
        monkeypatch.setenv(sl.KERNEL_ENV, "torch")
        plain = layer(x)
        assert calls == []
        monkeypatch.setenv(sl.KERNEL_ENV, kernel_env)
        fused = layer(x)
        assert calls == [1]
    assert torch.allclose(fused, plain, atol=1e-5)
    with torch.enable_grad():  # a forward that needs a gradient stays on the torch path
        layer(x.clone().requires_grad_())
    assert calls == [1]
    monkeypatch.delenv(sl.KERNEL_ENV)
    assert sl.kernel_requested(x.cpu()) is False  # CPU tensors: torch unless forced


def test_pool_through_kernels_equals_torch(tmp_path, monkeypatch, kernel_device, kernel_env):
    pytest.importorskip("triton")
    from adapterhub.adapter_pool import AdapterPool

    from .test_adapter_pool import make_bundle

    a = make_bundle(tmp_path / "a", "tiny-llama", "attn.{q,v}_proj -> lora(r=3)", seed=1)
    b = make_bundle(tmp_path / "b", "tiny-llama", "layers.[0..1].mlp.down_proj -> lora(r=11, rslora=true)", seed=2)
    model = build_builtin("tiny-llama").eval().to(kernel_device)
    pool = AdapterPool(model)
    pool.add(a)
    pool.add(b)
    rows = ["a", None, "b", "a"]
    ids = torch.randint(1, 256, (4, 5), generator=torch.Generator().manual_seed(3)).to(kernel_device)
    outs = {}
    for flag in ("torch", "triton"):
        monkeypatch.setenv(sl.KERNEL_ENV, kernel_env if flag == "triton" else "torch")
        with torch.no_grad(), pool.batch(rows):
            past = model(input_ids=ids[:, :-1], use_cache=True)  # prefill: SGMV
            step = model(input_ids=ids[:, -1:], past_key_values=past.past_key_values, use_cache=True)  # BGMV
        outs[flag] = (past.logits, step.logits)
    for got, want in zip(outs["triton"], outs["torch"]):
        assert torch.allclose(got, want, atol=1e-4), f"{(got - want).abs().max():.2e}"


def test_gathered_rows_cache_never_goes_stale(monkeypatch):
    """Forwards with the same rows reuse the gathered A / B; any slot write, clear, resize or in-place edit
    of a buffer (the pool's page-ins and removes are such writes) must show in the next forward."""
    monkeypatch.setenv(sl.KERNEL_ENV, "torch")
    layer, adapters = filled_layer(nn.Linear(IN, OUT), seed=8)
    rows = [2, -1, 0, 1, 4, 2]
    layer.set_rows(rows)
    x = torch.randn(len(rows), 1, IN, generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(10)

    def check(label):
        for _ in range(2):  # the first forward fills the cache, the second reads it
            with torch.no_grad():
                got = layer(x)
            want = formula(layer.base_layer, x, rows, adapters + [None] * (layer.slots - len(adapters)))
            assert torch.allclose(got.double(), want, atol=1e-4), f"{label}: {(got.double() - want).abs().max():.2e}"

    check("first")
    assert layer._gather_cache is not None
    a, b = torch.randn(3, IN, generator=g), torch.randn(OUT, 3, generator=g)
    layer.write_slot(0, a, b, 0.7)  # another adapter paged into a slot the rows use
    adapters[0] = (a, b, 0.7)
    check("write_slot")
    layer.clear_slot(1)
    adapters[1] = None
    check("clear_slot")
    with torch.no_grad():
        layer.lora_A[4].mul_(2.0)  # an in-place edit behind the layer's back
    a4, b4, s4 = adapters[4]
    adapters[4] = (a4 * 2.0, b4, s4)
    check("in-place edit")
    layer.lora_B = layer.lora_B.clone()  # a replaced buffer
    layer.lora_B[2].zero_()
    adapters[2] = None
    check("replaced buffer")
    layer.resize(SLOTS + 1, R + 2)
    check("resize")


def test_gathered_rows_cache_bound_inference_mode_and_gradients(monkeypatch):
    monkeypatch.setenv(sl.KERNEL_ENV, "torch")
    layer, adapters = filled_layer(nn.Linear(IN, OUT), seed=11)
    rows = [4, 5, 1, 1]
    layer.set_rows(rows)
    x = torch.randn(len(rows), 2, IN, generator=torch.Generator().manual_seed(12))
    want = formula(layer.base_layer, x, rows, adapters)
    monkeypatch.setattr(sl, "GATHER_CACHE_BYTES", 0)  # over the bound: nothing kept, same result
    with torch.no_grad():
        assert torch.allclose(layer(x).double(), want, atol=1e-4)
    assert layer._gather_cache is None
    monkeypatch.undo()
    monkeypatch.setenv(sl.KERNEL_ENV, "torch")
    with torch.inference_mode():
        assert torch.allclose(layer(x).double(), want, atol=1e-4)
    with torch.no_grad():  # a cache filled in inference mode is read outside it
        assert torch.allclose(layer(x).double(), want, atol=1e-4)
    assert layer._gather_cache is not None
    # with gradients on, the cache is bypassed: gradients reach x and a buffer made trainable
    layer.lora_B.requires_grad_(True)
    xg = x.clone().requires_grad_(True)
    layer(xg).pow(2).sum().backward()
    x64 = x.double().requires_grad_(True)
    b64 = layer.lora_B.detach().double().requires_grad_(True)
    base = layer.base_layer
    out = torch.nn.functional.linear(x64, base.weight.double(), base.bias.double())
    extra = []
    for row, slot in enumerate(rows):
        a, _, s = adapters[slot]
        r = a.shape[0]
        extra.append(s * (x64[row] @ a.double().t() @ b64[slot, :, :r].t()))
    (out + torch.stack(extra)).pow(2).sum().backward()
    assert torch.allclose(xg.grad.double(), x64.grad, atol=1e-3, rtol=1e-4)
    assert torch.allclose(layer.lora_B.grad.double(), b64.grad, atol=1e-3, rtol=1e-4)
