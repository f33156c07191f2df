"""The command line: help, plan (table and JSON), apply, plugins, quickstart, clean errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from adapterhub.cli import build_cli

COMMANDS = ["plan", "apply", "plugins", "quickstart"]


@pytest.fixture
def run():
    cli = build_cli()
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, list(args), catch_exceptions=False)
    return invoke


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.surgery"
    path.write_text("attn.* -> lora(r=8, alpha=16)\nmlp.* -> lora(r=4) on nf4\n")
    return path


def test_help_lists_every_command_and_each_has_help(run):
    top = run("--help")
    assert top.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in top.output
        sub = run(cmd, "--help")
        assert sub.exit_code == 0 and "Usage: " in sub.output and "--help" in sub.output


def test_plan_table_groups_layers_and_shows_totals(run, spec):
    res = run("plan", str(spec), "--model", "tiny-llama")
    assert res.exit_code == 0, res.output
    assert "model.layers.[0..3].self_attn.q_proj" in res.output
    assert "trainable params:" in res.output and "weights:" in res.output


def test_plan_json(run, spec):
    res = run("plan", str(spec), "--model", "tiny-gpt2", "--json")
    data = json.loads(res.output)
    assert data["trainable_params"] > 0 and len(data["entries"]) == 16


def test_bad_spec_prints_location_and_no_traceback(run, tmp_path):
    bad = tmp_path / "bad.surgery"
    bad.write_text("attn.* -> lroa(r=8)\n")
    res = run("plan", str(bad), "--model", "tiny-llama")
    assert res.exit_code == 1
    assert f"{bad}:1:11: error: unknown variant 'lroa'" in res.output
    assert "did you mean 'lora'" in res.output and "Traceback" not in res.output


def test_missing_spec_file_and_unknown_model(run, spec, tmp_path):
    res = run("plan", str(tmp_path / "nope.surgery"), "--model", "tiny-llama")
    assert res.exit_code != 0 and "Traceback" not in res.output
    res = run("plan", str(spec), "--model", "nobody/no-such-model")
    assert res.exit_code == 1
    assert "not in the local Hugging Face cache" in res.output and "Traceback" not in res.output
    res = run("plan", str(spec), "--model", "tiny-nothing")
    assert res.exit_code == 1 and "not a built-in model" in res.output


def test_apply_writes_an_initialised_bundle(run, spec, tmp_path):
    out = tmp_path / "bundle"
    res = run("apply", str(spec), "--model", "tiny-llama", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert (out / "adapter_model.safetensors").is_file()
    manifest = json.loads((out / "adapterhub.json").read_text())
    assert manifest["spec"] == spec.read_text()


def test_plugins_lists_builtins_with_params(run):
    res = run("plugins", "--json")
    data = json.loads(res.output)
    lora = next(v for v in data["variants"] if v["name"] == "lora")
    assert lora["plugin"] == "adapterhub.plugins.lora"
    assert [p["name"] for p in lora["params"]][:2] == ["r", "alpha"]
    assert {q["name"] for q in data["quantizers"]} >= {"nf4", "fp4", "int8"}
    assert "self_attn" in data["aliases"]["attn"]
    table = run("plugins")
    assert table.exit_code == 0 and "lora" in table.output


def test_quickstart_runs_end_to_end(run, tmp_path):
    out = tmp_path / "qs"
    res = run("quickstart", "--steps", "3", "--out", str(out))
    assert res.exit_code == 0, res.output
    assert "reloaded" in res.output and (out / "adapterhub.json").is_file()
