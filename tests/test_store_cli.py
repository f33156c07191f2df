"""The store commands (hub/cli_store.py): save, versions, show, diff, tag, rm, fsck."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import adapterhub
from adapterhub.cli import build_cli
from adapterhub.store import Store
from adapterhub.store_diff import MATERIALISE_LIMIT, _lowrank_norms

from .test_store import make_bundle

SPEC_A = "attn.q_proj -> lora(r=4, alpha=8)\nattn.v_proj -> dora(r=2)\nmlp.up_proj -> multilora(n=2, r=2)\n"
SPEC_B = ("attn.q_proj -> lora(r=8, alpha=8, rslora=true)\nattn.v_proj -> dora(r=2)\n"
          "mlp.up_proj -> multilora(n=2, r=2)\n")


def _trained_bundle(path: Path, spec: str, seed: int, loss: float) -> Path:
    """tiny-llama with ``spec``, every trainable tensor moved by seeded noise, saved to ``path``."""
    model = adapterhub.load_model("tiny-llama")
    adapterhub.apply(model, spec, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    adapterhub.save(model, path, metrics={"loss": loss})
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {"a1": _trained_bundle(root / "a1", SPEC_A, 1, 2.0), "a2": _trained_bundle(root / "a2", SPEC_A, 2, 1.5),
            "b": _trained_bundle(root / "b", SPEC_B, 3, 1.2)}


@pytest.fixture
def run(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    cli = build_cli()

    def invoke(*args: str, input: str | None = None, code: int = 0):
        result = CliRunner().invoke(cli, [str(a) for a in args], input=input)
        assert result.exit_code == code, result.output
        return result

    return invoke


def test_every_store_command_has_help(run):
    for cmd in ("save", "versions", "show", "diff", "tag", "rm", "fsck"):
        out = run(cmd, "--help").output
        assert "--home" in out and len(out.splitlines()) > 5


def test_save_prints_the_reference_and_versions_lists_them(run, bundles, tmp_path):
    assert run("save", bundles["a1"], "--name", "med", "--tag", "prod", "-m", "first").output == "med@v1\n"
    assert run("save", bundles["a2"], "--name", "med", "--parent", "med@prod").output == "med@v2\n"
    again = run("save", bundles["a2"], "--name", "med")
    assert again.stdout == "med@v2\n" and "unchanged" in again.stderr
    out = run("versions", "med").output
    for text in ("version", "tags", "date", "base", "parent", "size", "metrics", "v1", "v2", "prod", "tiny-llama",
                 "med@v1", "loss=1.5", "loss=2"):
        assert text in out
    rows = json.loads(run("versions", "med", "--json").output)
    assert [r["ref"] for r in rows] == ["med@v1", "med@v2"]
    assert rows[0]["tags"] == ["prod"] and rows[0]["message"] == "first" and rows[1]["parent"] == "med@v1"
    assert rows[1]["metrics"] == {"loss": 1.5} and rows[0]["size"] > 0
    assert json.loads(run("versions", "--json").output) == [{"name": "med", "versions": 2, "latest": "med@v2"}]
    assert "med@v2" in run("versions").output
    saved = json.loads(run("save", bundles["b"], "--name", "med", "--json").output)
    assert saved["ref"] == "med@v3" and saved["new"] is True


def test_show_summarises_the_manifest_files_and_spec(run, bundles):
    run("save", bundles["a1"], "--name", "med", "--tag", "prod", "-m", "a note")
    out = run("show", "med@prod").output
    for text in ("med@v1", "sha256:", "prod", "tiny-llama", "a note", "loss=2", "lora x4", "dora x4",
                 "multilora x4", "adapter_model.safetensors", "adapterhub.json", "README.md",
                 "attn.q_proj -> lora(r=4, alpha=8)"):
        assert text in out
    data = json.loads(run("show", "med", "--json").output)
    assert data["ref"] == "med@v1" and data["manifest"]["spec"] == SPEC_A
    assert set(data["files"]) == {"adapter_model.safetensors", "adapterhub.json", "README.md"}


def _delta_ratios(bundle_a: Path, bundle_b: Path) -> dict[str, float]:
    """||dW_b - dW_a|| / ||dW_a|| per adapted module, from the loaded layers' own delta_weight()."""
    deltas = []
    for bundle in (bundle_a, bundle_b):
        model = adapterhub.load(adapterhub.load_model("tiny-llama"), bundle).double()  # fp64: exact reference
        deltas.append({n: layer.delta_weight() for n, layer in adapterhub.adapter_layers(model)})
    return {n: ((deltas[1][n] - deltas[0][n]).norm() / deltas[0][n].norm()).item() for n in deltas[0]}


def test_diff_spec_and_delta_weight_change(run, bundles):
    for key in ("a1", "a2", "b"):
        run("save", bundles[key], "--name", "med")
    rows = json.loads(run("diff", "med@v1", "med@v2", "--json").output)
    assert rows["spec_diff"] == "" and rows["metrics"] == {"loss": [2.0, 1.5]}
    by_module = {r["module"]: r for r in rows["modules"]}
    truth = _delta_ratios(bundles["a1"], bundles["a2"])
    for name, r in by_module.items():
        if name.endswith("q_proj") or name.endswith("up_proj"):  # lora / multilora: dW from the factors
            assert r["method"].startswith("ΔW")
            assert r["change"] == pytest.approx(truth[name], rel=1e-9)
        else:  # DoRA: its dW needs W0, so the tensors are compared
            assert r["variant"] == "dora" and r["method"] == "tensors" and r["change"] > 0
    # rank and scaling change (r=4 -> r=8 with rslora): still exact from the factors
    d = json.loads(run("diff", "med@v2", "med@v3", "--json").output)
    truth = _delta_ratios(bundles["a2"], bundles["b"])
    assert "-attn.q_proj -> lora(r=4, alpha=8)" in d["spec_diff"]
    assert "+attn.q_proj -> lora(r=8, alpha=8, rslora=true)" in d["spec_diff"]
    for r in d["modules"]:
        if r["module"].endswith("q_proj"):
            assert r["change"] == pytest.approx(truth[r["module"]], rel=1e-9)
    text = run("diff", "med@v2", "med@v3").output
    for s in ("--- med@v2 spec", "+++ med@v3 spec", "ΔW = s·B·A", "tensors", "model.layers.0.self_attn.q_proj",
              "metric loss: 1.5 → 1.2", "the module's own tensors are compared"):
        assert s in text
    same = json.loads(run("diff", "med@v1", bundles["a1"], "--json").output)  # a directory works too
    assert all(r["change"] == 0 for r in same["modules"])
    assert "specs are identical" in run("diff", "med@v1", "med@v2").output


def test_low_rank_norms_without_materialising(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    f1 = (torch.randn(50, 3, generator=gen).double(), torch.randn(3, 40, generator=gen).double())
    f2 = (torch.randn(50, 5, generator=gen).double(), torch.randn(5, 40, generator=gen).double())
    exact = _lowrank_norms(f1, f2)
    d1, d2 = f1[0] @ f1[1], f2[0] @ f2[1]
    assert exact == pytest.approx((d1.norm().item(), d2.norm().item(), (d2 - d1).norm().item()), rel=1e-12)
    monkeypatch.setattr("adapterhub.store_diff.MATERIALISE_LIMIT", 0)
    assert _lowrank_norms(f1, f2) == pytest.approx(exact, rel=1e-9)
    assert MATERIALISE_LIMIT > 0


def test_diff_of_added_removed_and_changed_variants(run, tmp_path):
    a = _trained_bundle(tmp_path / "a", "attn.q_proj -> lora(r=2)\n", 0, 1.0)
    b = _trained_bundle(tmp_path / "b", "attn.q_proj -> ia3\nattn.k_proj -> lora(r=2)\n", 0, 1.0)
    d = json.loads(run("diff", a, b, "--json").output)
    rows = {r["module"]: r for r in d["modules"]}
    assert rows["model.layers.0.self_attn.k_proj"]["method"] == "added"
    assert rows["model.layers.0.self_attn.q_proj"]["variant"] == "lora → ia3"
    assert rows["model.layers.0.self_attn.q_proj"]["change"] is None
    back = json.loads(run("diff", b, a, "--json").output)
    assert {r["module"]: r for r in back["modules"]}["model.layers.0.self_attn.k_proj"]["method"] == "removed"


def test_tag_moves_and_rm_asks_first(run, tmp_path):
    b = make_bundle(tmp_path / "b", b"1")
    run("save", b, "--name", "m", "--tag", "prod")
    (b / "adapter_model.safetensors").write_bytes(b"2")
    run("save", b, "--name", "m")
    assert run("tag", "m@v2", "prod").output == "m@prod -> m@v2 (moved from m@v1)\n"
    assert run("tag", "m@v1", "old").output == "m@old -> m@v1\n"
    assert "invalid tag" in run("tag", "m@v1", "v9", code=1).output
    out = run("rm", "m@prod", input="n\n", code=1).output
    assert "remove m@v2" in out and "tags: prod" in out and "Aborted" in out
    assert [v["ref"] for v in json.loads(run("versions", "m", "--json").output)] == ["m@v1", "m@v2"]
    assert run("rm", "m@v2", input="y\n").output.endswith("removed m@v2\n")
    assert run("rm", "m@old", "--yes").output == "removed m@v1\n"
    assert "no adapter named 'm'" in run("show", "m", code=1).output


def test_unknown_references_are_clear_errors(run, tmp_path):
    run("save", make_bundle(tmp_path / "b", b"1"), "--name", "medical", "--tag", "prod")
    assert "error: no adapter named 'medicl'" in run("show", "medicl@v1", code=1).output
    assert "did you mean 'medical'" in run("versions", "medicl", code=1).output
    assert "medical@v4 does not exist" in run("diff", "medical@v1", "medical@v4", code=1).output
    assert "did you mean 'prod'" in run("rm", "medical@prd", "--yes", code=1).output
    assert "invalid name" in run("save", tmp_path / "b", "--name", "../evil", code=1).output


def test_fsck_exit_status(run, tmp_path):
    b = make_bundle(tmp_path / "b", b"payload")
    run("save", b, "--name", "m")
    assert run("fsck").output.rstrip().endswith("1 version(s), 3 blob(s): ok")
    store = Store(tmp_path / "home")
    blob = store.blob_path(store.resolve("m").files["adapter_model.safetensors"])
    os.chmod(blob, 0o644)
    blob.write_bytes(b"rot")
    out = run("fsck", code=1).output
    assert "problem: m@v1: file adapter_model.safetensors" in out and "1 problem(s)" in out
    report = json.loads(run("fsck", "--json", code=1).output)
    assert report["ok"] is False and len(report["problems"]) == 1


def test_home_option_overrides_the_environment(run, tmp_path):
    other = tmp_path / "elsewhere"
    assert run("save", make_bundle(tmp_path / "b", b"1"), "--name", "m", "--home", other).output == "m@v1\n"
    assert Store(other).names() == ["m"]
    assert "is empty" in run("versions", "m", code=1).output  # $ADAPTERHUB_HOME is another store
    assert "m: 1 version(s)" in run("versions", "m", "--home", other).output
