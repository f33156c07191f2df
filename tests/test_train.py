"""adapterhub.train / ``adapterhub train``: loss goes down, reproducible, resumable, masking, eval, store."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from adapterhub.bundle import adapter_state, read_manifest
from adapterhub.cli import build_cli
from adapterhub.registry import AdapterhubError
from adapterhub.train_data import IGNORE, build_dataset, byte_tokenizer, pack, read_examples
from adapterhub.training import lr_factor, train

SPEC = "attn.* -> lora(r=4, alpha=8)\n"
TEXT = ("the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs. " * 40)
SMALL = dict(seq_len=32, batch_size=4, seed=0)


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return path


def _state(result) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in adapter_state(result.model).items()}


def test_loss_decreases(corpus):
    r = train("tiny-llama", SPEC, corpus, steps=20, lr=3e-3, **SMALL)
    assert len(r.losses) == 20
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.1
    assert r.metrics["steps"] == 20 and r.metrics["tokens"] == 20 * 4 * 32
    assert r.metrics["train_loss"] == pytest.approx(r.losses[-1], abs=1e-5)


def test_same_seed_same_adapter_other_seed_differs(corpus):
    a = _state(train("tiny-llama", SPEC, corpus, steps=4, lr=1e-3, **SMALL))
    b = _state(train("tiny-llama", SPEC, corpus, steps=4, lr=1e-3, **SMALL))
    c = _state(train("tiny-llama", SPEC, corpus, steps=4, lr=1e-3, **dict(SMALL, seed=1)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


class Killed(Exception):
    pass


def _kill_at(step: int):
    def on_step(s: int, loss: float) -> None:
        if s == step:
            raise Killed

    return on_step


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_resume_after_kill_equals_uninterrupted(tmp_path, corpus, grad_accum):
    opts = dict(SMALL, steps=6, lr=3e-3, warmup_steps=2, grad_accum=grad_accum, eval_split=0.2, save_every=3)
    full = train("tiny-llama", SPEC, corpus, out=tmp_path / "full", **opts)
    with pytest.raises(Killed):
        train("tiny-llama", SPEC, corpus, out=tmp_path / "cut", on_step=_kill_at(4), **opts)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 3  # the checkpoint at step 3; step 4 was lost in the kill
    resumed = train("tiny-llama", SPEC, corpus, out=tmp_path / "cut", resume=True, **opts)
    a, b = _state(full), _state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    assert resumed.metrics["tokens"] == full.metrics["tokens"]
    assert resumed.metrics["eval_loss"] == pytest.approx(full.metrics["eval_loss"], rel=1e-5)


def test_checkpoint_has_no_pickle(tmp_path, corpus):
    train("tiny-llama", SPEC, corpus, out=tmp_path / "o", steps=2, save_every=1, **SMALL)
    ck = tmp_path / "o" / "checkpoint"
    names = sorted(p.name for p in ck.iterdir())
    assert names == ["adapter", "optimizer.safetensors", "rng.safetensors", "state.json"]
    from safetensors.torch import load_file

    opt = load_file(str(ck / "optimizer.safetensors"))
    assert {k.split(".", 1)[1] for k in opt} == {"exp_avg", "exp_avg_sq", "step"}


def test_resume_without_checkpoint_is_an_error(tmp_path, corpus):
    with pytest.raises(AdapterhubError, match="no checkpoint"):
        train("tiny-llama", SPEC, corpus, out=tmp_path / "o", steps=2, resume=True, **SMALL)


def test_jsonl_prompt_response_masks_the_prompt(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Q: 2+2? ", "response": "A: four.\n"}, {"text": "plain text line.\n"}] * 20
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    examples = read_examples(path)
    assert examples[0] == ("Q: 2+2? ", "A: four.\n") and examples[1] == ("", "plain text line.\n")
    ids, labels = pack(examples[:2], byte_tokenizer(), seq_len=8)
    flat_ids, flat_labels = ids.flatten().tolist(), labels.flatten().tolist()
    n_prompt = len("Q: 2+2? ")
    assert flat_labels[:n_prompt] == [IGNORE] * n_prompt
    assert flat_labels[n_prompt:] == flat_ids[n_prompt:]
    assert bytes(flat_ids[:n_prompt]) == b"Q: 2+2? "
    r = train("tiny-llama", SPEC, path, steps=3, lr=3e-3, eval_split=0.25, **SMALL)
    assert math.isfinite(r.metrics["eval_loss"])


def test_only_response_tokens_carry_labels(tmp_path):
    ds = build_dataset(_jsonl(tmp_path, "a", "x" * 40, "y" * 24), byte_tokenizer(),
                       seq_len=64, batch_size=1, eval_split=0, seed=0)
    _, labels = ds.batch(0)
    assert int((labels != IGNORE).sum()) == 24


def _jsonl(tmp_path, stem: str, prompt: str, response: str):
    path = tmp_path / f"{stem}.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def test_eval_loss_every_and_at_end(tmp_path, corpus):
    r = train("tiny-llama", SPEC, corpus, out=tmp_path / "o", steps=6, eval_split=0.2, eval_every=2, **SMALL)
    assert [s for s, _ in r.eval_losses] == [2, 4, 6]
    m = read_manifest(tmp_path / "o")["metrics"]
    assert m["eval_loss"] == pytest.approx(r.eval_losses[-1][1], abs=1e-5)
    assert {"train_loss", "eval_loss", "steps", "tokens", "seconds"} <= m.keys()


def test_epochs_bf16_checkpointing_8bit(corpus):
    r = train("tiny-llama", SPEC, corpus, epochs=1, grad_accum=2, bf16=True, grad_checkpointing=True,
              optimizer="adamw_8bit", lr=1e-3, **SMALL)
    n_seq = len(TEXT.encode()) // 32
    assert r.metrics["steps"] == math.ceil((n_seq // 4) / 2)
    assert all(math.isfinite(x) for x in r.losses)


def test_gpt2_trains(corpus):
    r = train("tiny-gpt2", "attn.c_attn -> lora(r=4)", corpus, steps=2, **SMALL)
    assert len(r.losses) == 2


def test_lr_schedule():
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(1, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 2, "constant") == 1.0


@pytest.mark.parametrize("name, content, message", [
    ("missing.txt", None, "does not exist"),
    ("empty.txt", "  \n", "is empty"),
    ("data.csv", "a,b\n", "expected a .txt or .jsonl"),
    ("bad.jsonl", '{"text": "ok"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
    ("fields.jsonl", '{"question": "x"}\n', 'fields.jsonl:1: expected an object with a string "text"'),
    ("short.txt", "tiny", "fewer than one sequence"),
    ("binary.txt", b"\xff\xfe\x00", "not UTF-8"),
])
def test_bad_data_is_a_clear_error(tmp_path, name, content, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(AdapterhubError, match=message):
        train("tiny-llama", SPEC, path, steps=1, **SMALL)


def test_bad_options(corpus):
    with pytest.raises(AdapterhubError, match="exactly one of --steps and --epochs"):
        train("tiny-llama", SPEC, corpus, **SMALL)
    with pytest.raises(AdapterhubError, match="--schedule"):
        train("tiny-llama", SPEC, corpus, steps=1, schedule="linear", **SMALL)
    with pytest.raises(AdapterhubError, match="need --out"):
        train("tiny-llama", SPEC, corpus, steps=1, save_every=1, **SMALL)


def test_cli_train_stores_a_version(tmp_path, corpus, monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    spec = tmp_path / "a.surgery"
    spec.write_text(SPEC)
    args = [str(spec), "--model", "tiny-llama", "--data", str(corpus), "--out", str(tmp_path / "o"), "--steps", "3",
            "--seq-len", "32", "--batch-size", "4", "--eval-split", "0.2", "--name", "fox"]
    res = CliRunner().invoke(build_cli(), ["train", *args])
    assert res.exit_code == 0, res.output
    assert "stored fox@v1" in res.output and "eval loss" in res.output
    from adapterhub.store import Store

    v = Store().resolve("fox")
    assert v.ref == "fox@v1"
    files = set(json.loads(Store().read_bytes(v, "adapterhub.json"))["metrics"])
    assert {"eval_loss", "train_loss", "tokens"} <= files


def test_cli_errors(tmp_path, corpus):
    spec = tmp_path / "a.surgery"
    spec.write_text(SPEC)
    res = CliRunner().invoke(build_cli(), ["train", str(spec), "--model", "tiny-llama", "--data",
                                           str(tmp_path / "nope.txt"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "does not exist" in res.output
    res = CliRunner().invoke(build_cli(), ["train", str(spec), str(spec), "--model", "tiny-llama", "--data",
                                           str(corpus), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1 and "--compare" in res.output


def test_resume_with_8bit_optimizer(tmp_path, corpus):
    opts = dict(SMALL, steps=4, lr=3e-3, save_every=2, optimizer="adamw_8bit")
    spec = "attn.* -> lora(r=64, alpha=64)"  # big enough for bitsandbytes' 8-bit state (>= 4096 elements)
    full = train("tiny-llama", spec, corpus, out=tmp_path / "full", **opts)
    with pytest.raises(Killed):
        train("tiny-llama", spec, corpus, out=tmp_path / "cut", on_step=_kill_at(3), **opts)
    resumed = train("tiny-llama", spec, corpus, out=tmp_path / "cut", resume=True, **opts)
    a, b = _state(full), _state(resumed)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


def test_cli_compare(tmp_path, corpus):
    specs = []
    for stem, text in (("small", "attn.* -> lora(r=2)"), ("big", "attn.* -> lora(r=8)")):
        specs.append(tmp_path / f"{stem}.surgery")
        specs[-1].write_text(text + "\n")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(build_cli(), ["train", *map(str, specs), "--compare", "--model", "tiny-llama", "--data",
                                           str(corpus), "--out", str(out), "--steps", "2", "--seq-len", "32",
                                           "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    for col in ("trainable", "weights", "peak mem", "time", "tokens/s", "eval loss"):
        assert col in res.output
    rows = json.loads((out / "compare.json").read_text())
    assert [r["spec"] for r in rows] == ["small", "big"]
    assert rows[1]["trainable"] == 4 * rows[0]["trainable"]  # LoRA parameters grow linearly in r
    assert all(len(r["losses"]) == 2 and r["eval_loss"] is not None for r in rows)
    assert (out / "small" / "adapterhub.json").is_file() and (out / "big" / "adapterhub.json").is_file()
    _check_png(out / "loss_curves.png", rows)
    res = CliRunner().invoke(build_cli(), ["train", str(specs[0]), "--compare", "--model", "tiny-llama", "--data",
                                           str(corpus)])
    assert res.exit_code == 1 and "at least two" in res.output


def test_resume_with_other_settings_is_an_error(tmp_path, corpus):
    train("tiny-llama", SPEC, corpus, out=tmp_path / "o", steps=2, save_every=1, **SMALL)
    with pytest.raises(AdapterhubError, match="other settings.*seq_len=32"):
        train("tiny-llama", SPEC, corpus, out=tmp_path / "o", steps=4, resume=True, **dict(SMALL, seq_len=16))
    with pytest.raises(AdapterhubError, match="other settings.*spec="):
        train("tiny-llama", "mlp.* -> lora(r=2)", corpus, out=tmp_path / "o", steps=4, resume=True, **SMALL)


def test_model_directory_uses_its_tokenizer(tmp_path, llama_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(TEXT.replace(".", " .").split()))
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    corpus = tmp_path / "words.jsonl"
    corpus.write_text("".join(json.dumps({"text": line.replace(".", " .")}) + "\n" for line in TEXT.split(". ")))
    with pytest.raises(AdapterhubError, match="needs tokenizer files"):
        train(str(llama_dir), SPEC, corpus, steps=1, **dict(SMALL, seq_len=8))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(llama_dir)
    ds_ids = []
    r = train(str(llama_dir), SPEC, corpus, steps=2, on_step=lambda s, loss: ds_ids.append(s),
              **dict(SMALL, seq_len=8))
    assert ds_ids == [1, 2] and all(math.isfinite(x) for x in r.losses)
    from adapterhub.train_data import load_tokenizer

    t = load_tokenizer(llama_dir)
    assert t.eos_id == 1 and t.encode("the quick fox") == [vocab["the"], vocab["quick"], vocab["fox"]]


@pytest.mark.skipif("train" not in __import__("adapterhub")._EXPORTS, reason="adapterhub.train not exported yet")
def test_public_api(corpus):
    import adapterhub
    import adapterhub.training  # noqa: F401  (a submodule import must not shadow adapterhub.train)

    r = adapterhub.train("tiny-llama", SPEC, corpus, steps=1, **SMALL)
    assert isinstance(r, adapterhub.TrainResult) and r.metrics["steps"] == 1


def _check_png(path, rows):
    """A real PNG of 7x4 inches at 120 dpi with the first two matplotlib colours (one per spec) drawn."""
    pytest.importorskip("matplotlib")
    import numpy as np
    from matplotlib import colors
    from matplotlib import image as mpimg

    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 10_000
    pixels = mpimg.imread(path)
    assert pixels.shape[:2] == (4 * 120, 7 * 120)
    rgb = (pixels[..., :3] * 255).round().astype(int).reshape(-1, 3)
    for i in range(len(rows)):  # each spec's curve is drawn in its own colour
        want = np.array([round(c * 255) for c in colors.to_rgb(f"C{i}")])
        assert (np.abs(rgb - want).sum(1) <= 3).sum() > 50, f"no curve in colour C{i} for {rows[i]['spec']}"


def test_compare_png_without_matplotlib_is_a_note(tmp_path, monkeypatch):
    import sys

    from adapterhub.cli_train import plot_losses

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    note = plot_losses([{"spec": "a", "losses": [1.0, 0.5], "eval_losses": []}], tmp_path / "loss_curves.png")
    assert "matplotlib is not installed" in note and "compare.json" in note
    assert not (tmp_path / "loss_curves.png").exists()
