"""The ``lq`` quantizer: NF-b codebooks, the two-level packed format against a reference written
here from the format's definition, the ILP allocation, Fisher files, checkpoints and the plan."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.stats import norm
from torch import nn
from transformers.pytorch_utils import Conv1D

import adapterhub
from adapterhub.cli import build_cli
from adapterhub.models import build_builtin
from adapterhub.plugins import _nfk
from adapterhub.plugins._lq_fisher import FisherFile, calibration_windows, fisher_information, save_fisher
from adapterhub.plugins.lq import (
    LqLinear,
    LqParams,
    config_error_estimates,
    configs_of,
    fixed_config,
    solve_allocation,
)
from adapterhub.registry import ParamError, bind, get_registry
from adapterhub.report import plan_table

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
ATTN = "attn.* -> freeze on lq(budget={budget}, rank=4)"
SCALE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def lq(**params):
    return bind(LqParams, params, owner="lq")


def quantize(weight: torch.Tensor, bias: bool = False, **params) -> LqLinear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return get_registry().quantizers["lq"].quantize(lin, lq(**params))


def config_of(entry) -> _nfk.NfConfig:
    return _nfk.NfConfig(**{k: entry.quant_params[k] for k in ("bits", "b0", "B0", "b1", "B1")})


def average_bits(plan) -> float:
    entries = [e for e in plan.entries if e.quant == "lq"]
    total = sum(e.params_before for e in entries)
    return sum(config_of(e).bits_per_param * e.params_before for e in entries) / total


# --------------------------------------------------------------------------- codebooks


def test_nf4_is_the_standard_code_and_bitsandbytes():
    from adapterhub.plugins._bnb import bnb_functional

    assert torch.equal(_nfk.nf_code(4), torch.tensor(NF4, dtype=torch.float32))
    bnb = bnb_functional().create_normal_map()
    assert torch.equal(_nfk.nf_code(4), torch.cat([bnb[:8], bnb[-8:]]))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_codebook_construction(bits):
    code = _nfk.nf_code(bits).double()
    half = 2 ** (bits - 1)
    assert code.numel() == 2 ** bits
    assert torch.all(code[1:] > code[:-1]) and code[0] == -1 and code[-1] == 1
    assert (code == 0).sum() == 1 and (code > 0).sum() == half and (code < 0).sum() == half - 1
    top = norm.ppf(0.9677083)
    positives = norm.ppf(np.linspace(0.9677083, 0.5, half + 1)[:-1]) / top
    negatives = -norm.ppf(np.linspace(0.9677083, 0.5, half)[:-1]) / top  # the mirrored half, one fewer
    assert np.allclose(np.sort(code[code > 0].numpy()), np.sort(positives), atol=1e-6)
    assert np.allclose(np.sort(code[code < 0].numpy()), np.sort(negatives), atol=1e-6)


# --------------------------------------------------------------------------- packing and format


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 9, 1001])
def test_pack_round_trip_and_size(bits, n):
    codes = torch.randint(0, 2 ** bits, (n,), generator=torch.Generator().manual_seed(n))
    packed = _nfk.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(_nfk.unpack_bits(packed, bits, n), codes)


def test_bitstream_is_little_endian():
    assert _nfk.pack_bits(torch.tensor([1, 2, 3]), 3).tolist() == [1 | 2 << 3 | (3 << 6) & 255, 3 >> 2]
    assert _nfk.pack_bits(torch.tensor([1, 2, 3]), 4).tolist() == [0x21, 0x03]


def reference_quantize(w: torch.Tensor, c: _nfk.NfConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Expected (block scale, x = w / scale, dequantized w) from the format's definition, in numpy."""
    flat = w.float().reshape(-1).numpy()
    n, nb = flat.size, -(-flat.size // c.B0)
    s1 = np.array([np.abs(flat[j * c.B0:(j + 1) * c.B0]).max() for j in range(nb)], dtype=np.float32)
    offset = s1.min()
    r = s1 - offset
    s2 = np.array([r[g * c.B1:(g + 1) * c.B1].max() for g in range(-(-nb // c.B1))], dtype=np.float32)
    s2 = torch.tensor(s2).to(_nfk.SCALE_DTYPES[c.b1]).float().numpy()
    levels = 2 ** c.b0 - 1
    per = s2[np.arange(nb) // c.B1]
    c0 = np.where(per > 0, np.clip(np.round(r / np.where(per > 0, per, 1) * levels), 0, levels), 0)
    scale = (c0 * (per / levels) + offset).astype(np.float32)
    x = flat / scale[np.arange(n) // c.B0]
    code = _nfk.nf_code(c.bits).numpy()
    deq = code[np.abs(x[:, None] - code[None, :]).argmin(1)] * scale[np.arange(n) // c.B0]
    return scale, x, deq


CONFIGS = [_nfk.NfConfig(2, 8, 64, "fp32", 256), _nfk.NfConfig(3, 2, 16, "bf16", 16),
           _nfk.NfConfig(4, 4, 32, "fp16", 64), _nfk.NfConfig(8, 3, 16, "fp32", 16)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"nf{c.bits}-b0{c.b0}-B0{c.B0}-{c.b1}-B1{c.B1}")
@pytest.mark.parametrize("shape", [(7, 13), (33, 65), (64, 96), (5, 3)])
def test_quantize_dequantize_matches_reference(cfg, shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    q = quantize(w, **cfg.as_dict())
    scale, x, deq = reference_quantize(w, cfg)
    assert np.allclose(q.block_scales().numpy(), scale, rtol=1e-6, atol=0)
    got = q.dequantize().reshape(-1).numpy()
    code = _nfk.nf_code(cfg.bits).numpy()
    mids = (code[1:] + code[:-1]) / 2
    on_a_tie = np.abs(x[:, None] - mids[None, :]).min(1) < 1e-5  # float rounding may pick either code
    assert np.allclose(got[~on_a_tie], deq[~on_a_tie], rtol=1e-6, atol=1e-9)
    n, nb = w.numel(), -(-w.numel() // cfg.B0)
    expected = (math.ceil(n * cfg.bits / 8) + math.ceil(nb * cfg.b0 / 8)
                + -(-nb // cfg.B1) * SCALE_BYTES[cfg.b1] + 4)
    assert q.weight_bytes() == expected


def test_weight_bytes_match_the_formula_on_a_large_matrix():
    cfg = _nfk.NfConfig(3, 4, 32, "bf16", 64)
    q = quantize(torch.randn(256, 512), **cfg.as_dict())
    assert abs(q.weight_bytes() * 8 / (256 * 512) - cfg.bits_per_param) < 1e-3
    assert abs(_nfk.NfConfig(4, 8, 64, "fp32", 256).bits_per_param - 4.127) < 1e-3


def test_zero_matrix_and_zero_blocks_are_exact():
    w = torch.zeros(4, 40)
    w[1, 3] = 0.5
    q = quantize(w, bits=2, b0=2, B0=16, b1="bf16", B1=16)
    assert torch.equal(q.dequantize(), w)
    assert torch.equal(quantize(torch.zeros(3, 5), bits=3).dequantize(), torch.zeros(3, 5))


def test_dtypes_state_dict_and_forward():
    w = torch.randn(24, 40, dtype=torch.bfloat16)
    q = quantize(w, bias=True, bits=4, b1="fp16")
    assert q.dequantize().dtype == torch.bfloat16 and q.scale2.dtype == torch.float16
    q.to(torch.float32)
    assert q.scale2.dtype == torch.float16 and q.offset.dtype == torch.float32
    x = torch.randn(3, 40)
    assert torch.allclose(q(x), x @ q.dequantize().t() + q.bias, atol=1e-6)
    fresh = quantize(torch.randn(24, 40, dtype=torch.bfloat16), bias=True, bits=4, b1="fp16")
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh.dequantize(), q.dequantize().to(torch.bfloat16))


def test_module_records_its_config_for_requantizing():
    q = quantize(torch.randn(8, 32), bits=3, b0=4, B0=16, b1="bf16", B1=16)
    values = {k: getattr(q, k) for k in ("budget", "bits", "b0", "B0", "b1", "B1", "rank", "fisher")}
    assert fixed_config(lq(**values)) == q.config


def test_conv1d_is_transposed():
    conv = Conv1D(12, 20)  # in 20, out 12; weight stored 20 x 12
    q = get_registry().quantizers["lq"].quantize(conv, lq(bits=8))
    assert (q.in_features, q.out_features) == (20, 12)
    assert torch.allclose(q.dequantize(), conv.weight.t(), atol=conv.weight.abs().max().item() / 50)


def test_params_are_validated():
    for bad, name in [({"bits": 9}, "bits"), ({"b0": 1}, "b0"), ({"bits": [2, 3]}, "bits"),
                      ({"budget": 3, "B0": [16, 16]}, "B0"), ({"b1": "fp8"}, "b1"), ({"budget": 0}, "budget")]:
        with pytest.raises(ParamError) as exc:
            lq(**bad)
        assert exc.value.param == name
    assert fixed_config(lq()) == _nfk.NfConfig(4, 8, 64, "fp32", 256)
    assert len(configs_of(lq(budget=3))) == 432
    assert {c.bits for c in configs_of(lq(budget=3, bits=[2, 4], B0=64))} == {2, 4}


# --------------------------------------------------------------------------- the ILP


def brute_force(errors, bits, sizes, budget):
    best = np.inf
    share = sizes / sizes.sum()
    for combo in itertools.product(range(len(bits)), repeat=len(sizes)):
        if share @ bits[list(combo)] <= budget and errors[range(len(sizes)), combo].sum() < best:
            best = errors[range(len(sizes)), combo].sum()
    return best


@pytest.mark.parametrize("solver", ["auto", "milp"])
@pytest.mark.parametrize("seed", range(4))
def test_ilp_is_optimal_and_within_budget_on_small_problems(seed, solver):
    rng = np.random.default_rng(seed)
    bits = np.array([2.03, 2.5, 3.1, 4.13, 8.0])
    errors = np.sort(rng.random((4, 5)), axis=1)[:, ::-1] * rng.random((4, 1))
    errors[:, 2] += rng.random(4) * 0.3  # some configs dominated by cheaper ones
    sizes = rng.integers(10, 1000, 4).astype(float)
    for budget in (2.1, 2.9, 3.6, 5.0):
        chosen = solve_allocation(errors, bits, sizes, budget, solver)
        assert (sizes / sizes.sum()) @ bits[chosen] <= budget
        assert errors[range(4), chosen].sum() == pytest.approx(brute_force(errors, bits, sizes, budget), rel=1e-6)


def test_dp_and_milp_agree_on_tiny_llama():
    model = build_builtin("tiny-llama")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".self_attn." in n]
    configs = configs_of(lq(budget=3))
    weights = [model.get_submodule(n).weight.detach() for n in names]
    errors = np.array([config_error_estimates(w, configs, 4) for w in weights])
    bits = np.array([c.bits_per_param for c in configs])
    sizes = np.array([w.numel() for w in weights], dtype=float)
    for budget in (3, 3.25):
        dp, mip = (solve_allocation(errors, bits, sizes, budget, s) for s in ("auto", "milp"))
        assert sizes @ bits[dp] / sizes.sum() <= budget and sizes @ bits[mip] / sizes.sum() <= budget
        best = errors[range(len(names)), dp].sum()
        assert best <= errors[range(len(names)), mip].sum() <= best * (1 + 1e-4)


def test_ilp_at_exactly_the_minimum_and_infeasible():
    bits = np.array([2.25, 3.0])
    errors = np.array([[2.0, 1.0], [3.0, 0.5]])
    assert solve_allocation(errors, bits, np.array([5.0, 5.0]), 2.25) == [0, 0]
    with pytest.raises(ParamError, match="minimum achievable .* 2.2500"):
        solve_allocation(errors, bits, np.array([5.0, 5.0]), 2.2)


def test_infeasible_budget_is_a_located_plan_error():
    with pytest.raises(adapterhub.SurgeryError) as exc:
        adapterhub.plan("tiny-llama", ATTN.format(budget=1.5))
    assert "infeasible" in str(exc.value) and "2.0322" in str(exc.value)


def test_plan_shows_the_chosen_config_per_matrix_and_bytes():
    plan = adapterhub.plan("tiny-llama", ATTN.format(budget=3))
    assert average_bits(plan) <= 3
    for e in plan.entries:
        assert e.bytes_after == math.ceil(e.params_before * config_of(e).bits_per_param / 8)
    text = " ".join(str(cell) for col in plan_table(plan, full=True).columns for cell in col._cells)
    assert "lq(budget=3, bits=" in text and "B0=" in text and "b1=" in text
    assert len({config_of(e) for e in plan.entries}) > 1  # not one config for all


def test_quantize_with_a_bare_budget_allocates_one_matrix():
    q = quantize(torch.randn(32, 48), budget=3.2, B0=32, B1=64)
    assert q.config.bits_per_param <= 3.2 and q.config.B0 == 32


def test_allocation_on_a_checkpoint_directory(llama_dir):
    spec = ATTN.format(budget=2.75)
    from_dir = adapterhub.plan(str(llama_dir), spec)
    live = adapterhub.plan("tiny-llama", spec)
    assert [e.quant_params for e in from_dir.entries] == [e.quant_params for e in live.entries]
    assert average_bits(from_dir) <= 2.75


# --------------------------------------------------------------------------- Fisher files


@pytest.fixture(scope="module")
def fisher_path(tmp_path_factory):
    model = build_builtin("tiny-llama")
    ids = list(("Fisher information on a few calibration windows. " * 8).encode())
    path = tmp_path_factory.mktemp("fisher") / "f.safetensors"
    return save_fisher(fisher_information(model, calibration_windows(ids, 4, 24)), path)


def test_fisher_file_covers_every_linear_and_restores_grad_flags(fisher_path):
    model = build_builtin("tiny-llama")
    f = FisherFile(fisher_path).get("model.layers.0.self_attn.k_proj", (32, 64))
    assert f.shape == (32, 64) and (f >= 0).all() and f.sum() > 0
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(adapterhub.AdapterhubError, match="no entry for module 'nope'"):
        FisherFile(fisher_path).get("nope", (1, 1))
    with pytest.raises(ParamError, match="does not exist"):
        FisherFile(fisher_path.parent / "missing.safetensors")


def test_fisher_changes_the_allocation(fisher_path):
    plain = adapterhub.plan("tiny-llama", ATTN.format(budget=2.75))
    weighted = adapterhub.plan("tiny-llama", f'attn.* -> freeze on lq(budget=2.75, rank=4, fisher="{fisher_path}")')
    assert [config_of(e) for e in plain.entries] != [config_of(e) for e in weighted.entries]
    assert average_bits(weighted) <= 2.75


def test_lq_fisher_command(tmp_path):
    out = tmp_path / "f.safetensors"
    result = CliRunner().invoke(build_cli(), ["lq-fisher", "--model", "tiny-gpt2", "--samples", "2",
                                              "--seq-len", "16", "-o", str(out)], catch_exceptions=False)
    assert result.exit_code == 0 and "wrote" in result.output
    f = FisherFile(out).get("transformer.h.0.attn.c_attn", (192, 64))  # Conv1D, stored out x in
    assert f.sum() > 0


# --------------------------------------------------------------------------- decomposition helpers


def test_randomized_svd_recovers_a_low_rank_matrix(monkeypatch):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 6, generator=g) @ torch.randn(6, 150, generator=g)
    exact = _nfk.svd_k(a, 6)
    monkeypatch.setattr(_nfk, "EXACT_SVD_MAX", 16)
    l1, l2 = _nfk.svd_k(a, 6)
    assert torch.allclose(l1 @ l2, a, atol=1e-3) and torch.allclose(l1 @ l2, exact[0] @ exact[1], atol=1e-3)
    assert torch.equal(l1, _nfk.svd_k(a, 6)[0])  # seeded: reproducible
    l1, l2 = _nfk.svd_k(torch.randn(5, 3, generator=g), 4)  # more rank than the matrix has: zero-padded
    assert l1.shape == (5, 4) and l2.shape == (4, 3) and torch.all(l1[:, 3] == 0)


def test_more_allocation_iterations_never_raise_the_estimate():
    w = torch.randn(40, 56, generator=torch.Generator().manual_seed(3))
    configs = configs_of(lq(budget=3, bits=[2, 3], b0=8, B0=[16, 64], b1="fp32", B1=256))
    one, three = config_error_estimates(w, configs, 4, 1), config_error_estimates(w, configs, 4, 3)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(one, three)) and sum(three) < sum(one)
    direct = [_nfk.weighted_error(w - _nfk.svd_k(w, 4)[0] @ _nfk.svd_k(w, 4)[1]
                                  - _nfk.fake_quantize(w - _nfk.svd_k(w, 4)[0] @ _nfk.svd_k(w, 4)[1], c))
              for c in configs]
    assert one == pytest.approx(direct, rel=1e-5)


def test_large_problems_fall_back_to_the_milp(monkeypatch):
    from adapterhub.plugins import lq as lq_module

    rng = np.random.default_rng(7)
    bits = np.array([2.03, 2.5, 3.1, 4.13])
    errors = np.sort(rng.random((5, 4)), axis=1)[:, ::-1].copy()
    sizes = rng.integers(10, 100, 5).astype(float)
    calls = []
    monkeypatch.setattr(lq_module, "DP_MAX_POINTS", 1)
    real = lq_module.milp_solve
    monkeypatch.setattr(lq_module, "milp_solve", lambda *a: calls.append(1) or real(*a))
    chosen = solve_allocation(errors, bits, sizes, 3.0)
    assert calls and errors[range(5), chosen].sum() == pytest.approx(brute_force(errors, bits, sizes, 3.0), rel=1e-6)
