"""``adapterhub compose``: merge methods on delta weights, exact linear/cat, truncation reports, refusals."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

import adapterhub
from adapterhub import AdapterhubError
from adapterhub.composition import compose
from adapterhub.models import build_builtin
from adapterhub.registry import get_registry

LLAMA_A = "attn.{q_proj,v_proj} -> lora(r=4, alpha=8)\n"
LLAMA_B = "attn.{v_proj,o_proj} -> lora(r=4, alpha=4)\n"
LLAMA_C = "attn.v_proj -> dora(r=2)\nmlp.* -> ia3\n"


def trained(name: str, spec: str, seed: int) -> torch.nn.Module:
    model = adapterhub.apply(build_builtin(name), spec, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    for key, name, spec, seed in [("A", "tiny-llama", LLAMA_A, 1), ("B", "tiny-llama", LLAMA_B, 2),
                                  ("C", "tiny-llama", LLAMA_C, 3),
                                  ("G1", "tiny-gpt2", "attn.c_attn -> lora(r=4)\n", 4),
                                  ("G2", "tiny-gpt2", "attn.c_attn -> glora(r=2)\nmlp.c_fc -> ia3\n", 5)]:
        adapterhub.save(trained(name, spec, seed), root / key)
        out[key] = root / key
    return out


def deltas(name: str, bundle) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """``{module: (ΔW out x in, Δb)}`` of a bundle loaded on a fresh base."""
    model = adapterhub.load(build_builtin(name), bundle)
    out = {}
    with torch.no_grad():
        for module, layer in adapterhub.adapter_layers(model):
            d = layer.delta_weight().float()
            db = layer.delta_bias()
            out[module] = (d.t() if layer.kind in ("conv1d", "embedding") else d, None if db is None else db.float())
    return out


def weighted(parts: list[tuple[float, dict]]) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for w, ds in parts:
        for m, (d, _) in ds.items():
            total[m] = total.get(m, 0) + w * d
    return total


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_linear_is_the_exact_weighted_sum_and_peft_linear_is_not(tmp_path, bundles, ids):
    report = compose([bundles["A"], bundles["B"]], tmp_path / "lin", method="linear", weights=[0.6, 0.4])
    da, db = deltas("tiny-llama", bundles["A"]), deltas("tiny-llama", bundles["B"])
    want = weighted([(0.6, da), (0.4, db)])
    got = deltas("tiny-llama", tmp_path / "lin")
    assert set(got) == set(want)  # q only in A, o only in B: the weighted sum of those present
    for m in want:
        assert rel(got[m][0], want[m]) <= 1e-5, m
    ranks = {r.module.rsplit(".", 1)[1]: r.rank for r in report.modules}
    assert ranks == {"q_proj": 4, "v_proj": 8, "o_proj": 4}  # default r = Σ r_i: exact
    assert report.max_error <= 1e-5
    # the composed model equals the base with W0 + Σ w_i ΔW_i
    base = build_builtin("tiny-llama")
    with torch.no_grad():
        for m, d in want.items():
            base.get_submodule(m).weight.add_(d)
        ref = base(input_ids=ids).logits
        out = adapterhub.load(build_builtin("tiny-llama"), tmp_path / "lin")(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= 1e-5
    # PEFT's "linear" mixes A and B separately: B_lin A_lin has cross terms B_a A_b
    peft = pytest.importorskip("peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(build_builtin("tiny-llama"), str(bundles["A"]), adapter_name="a")
        pm.load_adapter(str(bundles["B"]), adapter_name="b")
        pm.add_weighted_adapter(["a", "b"], [0.6, 0.4], "lin", combination_type="linear")
    v = "model.layers.1.self_attn.v_proj"
    peft_delta = pm.base_model.model.get_submodule(v).get_delta_weight("lin").float()
    assert rel(peft_delta, want[v]) > 1e-2
    assert rel(got[v][0], want[v]) <= 1e-5
    # all-LoRA output: PEFT loads the composed bundle with the same logits
    assert (tmp_path / "lin" / "adapter_config.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm2 = peft.PeftModel.from_pretrained(build_builtin("tiny-llama"), str(tmp_path / "lin")).eval()
    with torch.no_grad():
        assert (pm2(input_ids=ids).logits - out).abs().max().item() <= 1e-5


def test_cat_concatenates_the_lora_factors(tmp_path, bundles):
    report = compose([bundles["A"], bundles["B"]], tmp_path / "cat", method="cat", weights=[0.5, 2.0])
    v = "model.layers.0.self_attn.v_proj"
    assert next(r.rank for r in report.modules if r.module == v) == 8
    la = adapterhub.load(build_builtin("tiny-llama"), bundles["A"]).get_submodule(v)
    lb = adapterhub.load(build_builtin("tiny-llama"), bundles["B"]).get_submodule(v)
    with safe_open(str(tmp_path / "cat" / "adapter_model.safetensors"), "pt") as f:
        b = f.get_tensor(f"base_model.model.{v}.lora_B.weight")
        a = f.get_tensor(f"base_model.model.{v}.lora_A.weight")
    with torch.no_grad():
        want_b = torch.cat([0.5 * la.scaling * la.lora_B.weight, 2.0 * lb.scaling * lb.lora_B.weight], dim=1)
        want_a = torch.cat([la.lora_A.weight, lb.lora_A.weight], dim=0)
    assert torch.allclose(b, want_b, atol=1e-7) and torch.equal(a, want_a)


def test_cat_and_linear_are_exact_across_variants(tmp_path, bundles):
    da, dc = deltas("tiny-llama", bundles["A"]), deltas("tiny-llama", bundles["C"])
    want = weighted([(1.0, da), (-0.5, dc)])
    for method in ("cat", "linear"):
        report = compose([bundles["A"], bundles["C"]], tmp_path / method, method=method, weights=[1.0, -0.5])
        got = deltas("tiny-llama", tmp_path / method)
        assert all(rel(got[m][0], want[m]) <= 1e-5 for m in want), method
        assert report.max_error <= 1e-5
        v = next(r for r in report.modules if r.module.endswith("0.self_attn.v_proj"))
        assert v.variants == ["lora", "dora"] and v.inputs == [0, 1]


def test_svd_is_the_best_rank_r_approximation(tmp_path, bundles):
    report = compose([bundles["A"], bundles["B"]], tmp_path / "svd", method="svd", weights=[0.6, 0.4], rank=2)
    want = weighted([(0.6, deltas("tiny-llama", bundles["A"])), (0.4, deltas("tiny-llama", bundles["B"]))])
    got = deltas("tiny-llama", tmp_path / "svd")
    for m, d in want.items():
        u, s, vh = torch.linalg.svd(d.double(), full_matrices=False)
        best = (u[:, :2] * s[:2]) @ vh[:2]
        assert rel(got[m][0].double(), best) <= 1e-5, m
    assert {r.rank for r in report.modules} == {2}


def test_ties_matches_the_paper_on_a_hand_example():
    ties = get_registry().merge_methods["ties"]
    t1 = torch.tensor([3.0, -2.0, 0.5, 1.0])
    t2 = torch.tensor([-1.0, -4.0, 0.2, 2.0])
    # trim to 50%: [3, -2, 0, 0] and [0, -4, 0, 2]; elected signs [+, -, 0, +]; disjoint means
    out = ties.merge([t1, t2], [1.0, 1.0], ties.Params(density=0.5))
    assert torch.equal(out, torch.tensor([3.0, -3.0, 0.0, 2.0]))
    weighted_out = ties.merge([t1, t2], [2.0, 1.0], ties.Params(density=0.5))
    assert torch.equal(weighted_out, torch.tensor([6.0, -4.0, 0.0, 2.0]))


def test_dare_drops_rescales_and_is_seeded():
    reg = get_registry().merge_methods
    dare_linear, dare_ties = reg["dare_linear"], reg["dare_ties"]
    d = torch.randn(200, 100, generator=torch.Generator().manual_seed(0))
    p = dare_linear.Params(density=0.3, seed=7)
    out = dare_linear.merge([d], [2.0], p)
    kept = out != 0
    assert torch.allclose(out[kept], 2.0 * d[kept] / 0.3)
    assert abs(kept.float().mean().item() - 0.3) < 0.02
    assert torch.equal(out, dare_linear.merge([d], [2.0], p))
    assert not torch.equal(out, dare_linear.merge([d], [2.0], dare_linear.Params(density=0.3, seed=8)))
    mean = torch.stack([dare_linear.merge([d], [1.0], dare_linear.Params(density=0.5, seed=s))
                        for s in range(200)]).mean(0)
    assert rel(mean, d) < 0.15  # unbiased: E[dare(d)] = d
    # dare_ties on deltas of one sign everywhere: the mean of the kept (rescaled) entries
    a, b = d.abs(), 2 * d.abs()
    out = dare_ties.merge([a, b], [1.0, 1.0], dare_ties.Params(density=1.0))
    assert torch.allclose(out, (a + b) / 2)


def test_ties_and_dare_results_are_truncated_and_reported(tmp_path, bundles):
    report = compose([bundles["A"], bundles["B"]], tmp_path / "t", method="ties", weights=[1.0, 1.0],
                     params={"density": 0.3})
    assert report.max_error > 1e-3 and any("truncated" in n for n in report.notes)
    full = compose([bundles["A"], bundles["B"]], tmp_path / "tf", method="dare_ties", rank=64,
                   params={"density": 0.5, "seed": 1})
    assert full.max_error <= 1e-5  # at full rank the factorisation is exact
    assert full.params == {"density": 0.5, "seed": 1}


def test_bias_changes_are_composed_on_gpt2(tmp_path, bundles, ids):
    report = compose([bundles["G1"], bundles["G2"]], tmp_path / "g", method="linear", weights=[1.0, 0.5])
    d1, d2 = deltas("tiny-gpt2", bundles["G1"]), deltas("tiny-gpt2", bundles["G2"])
    c_attn = [r for r in report.modules if r.module.endswith("attn.c_attn")]
    assert c_attn and all(r.bias for r in c_attn) and report.max_error <= 1e-5
    assert "glora(a=none, b=lora, c=none, d=none, e=vector" in report.spec
    assert not (tmp_path / "g" / "adapter_config.json").exists()
    base = build_builtin("tiny-gpt2")
    with torch.no_grad():
        for w, ds in ((1.0, d1), (0.5, d2)):
            for m, (d, db) in ds.items():
                mod = base.get_submodule(m)
                mod.weight.add_(w * d.t())  # Conv1D stores W^T
                if db is not None:
                    mod.bias.add_(w * db)
        ref = base(input_ids=ids).logits
        out = adapterhub.load(build_builtin("tiny-gpt2"), tmp_path / "g")(input_ids=ids).logits
    assert (out - ref).abs().max().item() <= 1e-5


def test_store_refs_and_peft_directories(tmp_path, bundles, monkeypatch):
    peft = pytest.importorskip("peft")
    from adapterhub.store import Store

    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    ref = Store().save(bundles["A"], "medical").ref
    pm = peft.get_peft_model(build_builtin("tiny-llama"), peft.LoraConfig(r=2, target_modules=["v_proj"],
                                                                           init_lora_weights=False))
    pm.save_pretrained(tmp_path / "p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a PEFT directory carries no base fingerprint
        compose([ref, tmp_path / "p"], tmp_path / "c", weights=[1.0, 2.0])
        want = weighted([(1.0, deltas("tiny-llama", bundles["A"])), (2.0, deltas("tiny-llama", tmp_path / "p"))])
    got = deltas("tiny-llama", tmp_path / "c")
    assert set(got) == set(want) and all(rel(got[m][0], want[m]) <= 1e-5 for m in want)


def test_refusals_are_clear(tmp_path, bundles):
    adapterhub.save(trained("tiny-llama", "attn.o_proj -> bottleneck(size=4)\n", 1), tmp_path / "bn")
    with pytest.raises(AdapterhubError, match="bottleneck adapters .* cannot be merged"):
        compose([bundles["A"], tmp_path / "bn"], tmp_path / "x")
    with pytest.raises(AdapterhubError, match="different base models"):
        compose([bundles["A"], bundles["G1"]], tmp_path / "x")
    with pytest.raises(AdapterhubError, match="2 adapters but 1 weights"):
        compose([bundles["A"], bundles["B"]], tmp_path / "x", weights=[1.0])
    with pytest.raises(AdapterhubError, match="unknown merge method 'mean'.*linear"):
        compose([bundles["A"]], tmp_path / "x", method="mean")
    with pytest.raises(AdapterhubError, match="has no parameter 'density'"):
        compose([bundles["A"]], tmp_path / "x", params={"density": 0.5})
    with pytest.raises(AdapterhubError, match="density must be > 0"):
        compose([bundles["A"]], tmp_path / "x", method="ties", params={"density": 0.0})
    assert not (tmp_path / "x").exists()


def test_cli_compose_table_and_json(tmp_path, bundles):
    from adapterhub.cli import build_cli

    runner = CliRunner()
    res = runner.invoke(build_cli(), ["compose", str(bundles["A"]), str(bundles["B"]), "--method", "ties",
                                      "-w", "1,0.5", "-d", "0.5", "-o", str(tmp_path / "c"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["method"] == "ties" and data["params"] == {"density": 0.5} and len(data["modules"]) == 12
    res = runner.invoke(build_cli(), ["compose", str(bundles["A"]), str(bundles["B"]), "-w", "1,2,3",
                                      "-o", str(tmp_path / "d")])
    assert res.exit_code != 0 and "3 weights for 2 adapters" in res.output
    res = runner.invoke(build_cli(), ["compose", str(bundles["A"]), "--seed", "3", "-o", str(tmp_path / "d")])
    assert res.exit_code == 1 and "error: merge method linear has no parameter 'seed'" in res.output
    res = runner.invoke(build_cli(), ["compose", str(bundles["A"]), str(bundles["B"]), "-o", str(tmp_path / "e")])
    assert res.exit_code == 0 and "wrote" in res.output and "v_proj" in res.output
