"""``adapterhub glora-search`` on a tiny budget: it runs, its .surgery output plans on the model within
the parameter limit, the best fitness never gets worse, runs are reproducible, and the saved subnet
(weights inherited from the supernet) reproduces the searched held-out loss."""

from __future__ import annotations

import json

import click
import pytest
import torch
from click.testing import CliRunner

import adapterhub
from adapterhub.cli import build_cli
from adapterhub.models import build_builtin
from adapterhub.plugins.glora_search import Search, SearchSettings, parse_count

TINY = ["--budget", "small", "--train-steps", "3", "--population", "6", "--generations", "2", "--top-k", "3",
        "--crossovers", "2", "--mutations", "2", "--eval-batches", "1", "--batch-size", "4", "--seq-len", "32"]


def settings(**kw) -> SearchSettings:
    base = dict(train_steps=2, population=4, generations=2, top_k=2, crossovers=2, mutations=2, eval_batches=1,
                batch_size=2, seq_len=32, seed=3)
    return SearchSettings(**{**base, **kw})


@pytest.fixture
def run():
    cli, runner = build_cli(), CliRunner()
    return lambda *args: runner.invoke(cli, list(args), catch_exceptions=False)


def test_command_is_registered(run):
    assert "glora-search" in run("--help").output
    out = run("glora-search", "--help").output
    assert "--param-limit" in out and "--spec-pattern" in out and "--budget" in out


def test_cli_search_writes_a_plannable_spec_within_the_limit(run, tmp_path):
    out = tmp_path / "found.surgery"
    res = run("glora-search", *TINY, "--param-limit", "6k", "--out", str(out), "--json", "--seed", "1")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["param_limit"] == 6000 and summary["best_params"] <= 6000
    history = summary["history"]
    assert len(history) == 2 and history[-1]["best_loss"] <= history[0]["best_loss"]
    assert len(summary["train_losses"]) == 3
    text = out.read_text()
    assert text.count(" -> ") == 16  # one rule per attention projection of tiny-llama
    assert "model.layers.0.self_attn.q_proj -> " in text
    plan = adapterhub.plan("tiny-llama", out)
    assert plan.trainable == summary["best_params"] <= 6000 and not plan.warnings
    plan_out = run("plan", str(out), "--model", "tiny-llama")
    assert plan_out.exit_code == 0 and "glora" in plan_out.output


def test_table_output(run, tmp_path):
    res = run("glora-search", *TINY, "--generations", "1", "--out", str(tmp_path / "s.surgery"))
    assert res.exit_code == 0
    assert "best configuration per generation" in res.output and "wrote" in res.output


def test_inherited_subnet_reproduces_the_searched_loss(tmp_path):
    search = Search(settings())
    result = search.run()
    assert result.history[-1].best_loss <= result.history[0].best_loss
    search.save_bundle(result, tmp_path / "bundle")
    model = adapterhub.load(build_builtin("tiny-llama"), tmp_path / "bundle")
    model.eval()
    with torch.no_grad():
        loss = sum(model(input_ids=ids, labels=ids).loss.item() for ids in search.eval_batches)
    assert loss / len(search.eval_batches) == pytest.approx(result.best_loss, abs=1e-5)


def test_same_seed_same_result():
    a, b = Search(settings()).run(), Search(settings()).run()
    assert a.spec_text == b.spec_text and a.best_loss == b.best_loss


def test_tight_limit_is_respected_by_every_candidate():
    search = Search(settings(param_limit=150))
    result = search.run()
    assert result.best_params <= 150
    assert all(params <= 150 for _, params in search.seen.values())
    assert adapterhub.plan("tiny-llama", result.spec_text).trainable == result.best_params


def test_gpt2_searches_d_where_there_is_a_bias():
    search = Search(settings(model="tiny-gpt2", generations=1))
    assert all("vector" in ch["d"] for ch in search.choices)  # Conv1D always has a bias
    result = search.run()
    assert adapterhub.plan("tiny-gpt2", result.spec_text).trainable == result.best_params
    llama = Search(settings(train_steps=0, generations=1))
    assert all(ch["d"] == ("none",) for ch in llama.choices)  # no bias: b0 ⊙ D vanishes


def test_data_file_and_errors(run, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    res = run("glora-search", *TINY, "--data", str(short), "--out", str(tmp_path / "x.surgery"))
    assert res.exit_code == 1 and "longer than --seq-len" in res.output
    res = run("glora-search", *TINY, "--model", "tiny-bert", "--out", str(tmp_path / "x.surgery"))
    assert res.exit_code == 1 and "causal language model" in res.output
    res = run("glora-search", *TINY, "--param-limit", "lots")
    assert res.exit_code == 2 and "not a parameter count" in res.output


def test_parse_count():
    assert parse_count("20000") == 20000 and parse_count("20k") == 20000 and parse_count("1.5M") == 1_500_000
    assert parse_count(None) is None
    with pytest.raises(click.BadParameter):
        parse_count("-3")
