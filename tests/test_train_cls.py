"""Encoder classification training: data errors, encoding, loss/accuracy, head, bundle, resume, CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import adapterhub
from adapterhub.bundle import adapter_state, read_manifest
from adapterhub.cli import build_cli
from adapterhub.registry import AdapterhubError
from adapterhub.train_cls import (
    BYTE_SEP,
    build_cls_dataset,
    byte_cls_tokenizer,
    cls_loss,
    encode_examples,
    evaluate_file,
    label_set,
    read_labeled,
)
from adapterhub.train_head import head_modules, load_classification_model, load_classifier, with_head_rule
from adapterhub.training import train

SPEC = "attn.* -> lora(r=4, alpha=8)\n"
SMALL = dict(seq_len=24, batch_size=8, seed=0)
# each class writes with its own letters (a-h, i-p, q-x): the byte-level tiny-bert tells them apart quickly
WORDS = {"sport": ["bead", "cage", "face", "head", "badge", "chef"],
         "food": ["milk", "moon", "lion", "pool", "loop", "kilo"],
         "tech": ["rust", "trust", "tux", "vow", "wrx", "sus"]}


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    labels = sorted(WORDS)
    return [{"text": " ".join(rng.choice(WORDS[labels[i % 3]]) for _ in range(3)), "label": labels[i % 3]}
            for i in range(n)]


def _write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def labelled(tmp_path):
    return _write(tmp_path / "topics.jsonl", _rows(72))


# --------------------------------------------------------------------------- data


@pytest.mark.parametrize("line, message", [
    ('{"text": "x"}', 'bad.jsonl:2: missing "label"'),
    ('{"text": "x", "label": 1.5}', 'bad.jsonl:2: "label" must be an int or a non-empty string, got 1.5'),
    ('{"text": "x", "label": true}', 'bad.jsonl:2: "label" must be an int'),
    ('{"text": "x", "label": [1]}', 'bad.jsonl:2: "label" must be an int'),
    ('{"label": "a"}', 'bad.jsonl:2: "text" is missing'),
    ('{"text": 3, "label": "a"}', 'bad.jsonl:2: "text" is a int, not a string'),
    ('{"text": "x", "text_pair": 3, "label": "a"}', 'bad.jsonl:2: "text_pair" must be a string'),
    ('{"prompt": "q", "response": "r"}', "bad.jsonl:2: prompt/response data trains a causal LM"),
    ('{"text": "x", "label": 7}', "bad.jsonl:2: label 7 is a int, but line 1 has a str label"),
    ("[1, 2]", "bad.jsonl:2: expected an object"),
    ("{oops", "bad.jsonl:2: not valid JSON"),
])
def test_bad_labelled_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine", "label": "a"}\n' + line + "\n")
    with pytest.raises(AdapterhubError, match=message.replace("[", r"\[")):
        train("tiny-bert", SPEC, path, steps=1, **SMALL)


def test_wrong_kind_of_data_for_the_model(tmp_path, labelled):
    txt = tmp_path / "corpus.txt"
    txt.write_text("plain text " * 50)
    with pytest.raises(AdapterhubError, match=r"corpus.txt': a classification model \(an encoder\) needs a .jsonl"):
        train("tiny-bert", SPEC, txt, steps=1, **SMALL)
    with pytest.raises(AdapterhubError, match=r"topics.jsonl:1: a \"label\" field: labelled data trains a "
                                              r"classifier .* this model is a causal LM"):
        train("tiny-llama", SPEC, labelled, steps=1, **SMALL)
    one = _write(tmp_path / "one.jsonl", [{"text": "a", "label": 1}] * 4)
    with pytest.raises(AdapterhubError, match="1 distinct label"):
        train("tiny-bert", SPEC, one, steps=1, **SMALL)


def test_label_order_ints_by_value_strings_sorted(tmp_path):
    ints = read_labeled(_write(tmp_path / "i.jsonl", [{"text": "t", "label": v} for v in (10, 2, 1, 2)]))
    assert label_set(ints) == [1, 2, 10]  # by value, not "1" < "10" < "2"
    strs = read_labeled(_write(tmp_path / "s.jsonl", [{"text": "t", "label": v} for v in ("b", "a", "c", "a")]))
    assert label_set(strs) == ["a", "b", "c"]


def test_byte_encoding_pairs_padding_truncation(tmp_path):
    rows = [{"text": "hi", "label": 0}, {"text": "abc", "text_pair": "xy", "label": 1},
            {"text": "z" * 40, "label": 0}]
    examples = read_labeled(_write(tmp_path / "p.jsonl", rows))
    packed, labels = encode_examples(examples, [0, 1], byte_cls_tokenizer(), seq_len=8)
    ids, mask, types = packed[:, 0], packed[:, 1], packed[:, 2]
    assert labels.tolist() == [0, 1, 0]
    assert ids.shape == (3, 8)  # the longest row (truncated to seq_len)
    assert ids[0].tolist() == [ord("h"), ord("i")] + [0] * 6 and mask[0].tolist() == [1, 1] + [0] * 6
    assert ids[1, :6].tolist() == [*b"abc", BYTE_SEP, *b"xy"] and types[1, :6].tolist() == [0, 0, 0, 0, 1, 1]
    assert ids[2].tolist() == [ord("z")] * 8 and int(mask[2].sum()) == 8
    ds = build_cls_dataset(examples[:2], [0, 1], byte_cls_tokenizer(), seq_len=8, batch_size=2, eval_split=0, seed=0)
    batch, _ = ds.batch(0)
    assert batch.shape == (2, 3, 6)  # a batch is cut to its longest row


def test_loss_is_cross_entropy_and_padding_is_masked(labelled):
    examples = read_labeled(labelled)
    labels = label_set(examples)
    model = load_classification_model("tiny-bert", labels, seed=0)
    ds = build_cls_dataset(examples, labels, byte_cls_tokenizer(), seq_len=24, batch_size=6, eval_split=0, seed=0)
    packed, y = ds.batch(0)
    with torch.no_grad():
        logits = model(input_ids=packed[:, 0], attention_mask=packed[:, 1], token_type_ids=packed[:, 2]).logits
        assert float(cls_loss(model, packed, y)) == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-6)
        short = int(packed[:, 1].sum(-1).argmin())  # the shortest row, alone and without padding
        n = int(packed[short, 1].sum())
        alone = model(input_ids=packed[short:short + 1, 0, :n]).logits
    torch.testing.assert_close(logits[short:short + 1], alone, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- training


def test_trains_reports_accuracy_and_records_the_task(tmp_path, labelled):
    from rich.console import Console

    console = Console(record=True, width=200)
    r = train("tiny-bert", SPEC, labelled, out=tmp_path / "o", steps=40, lr=1e-2, eval_split=0.25,
              console=console, **SMALL)
    assert sum(r.losses[-5:]) / 5 < sum(r.losses[:5]) / 5 - 0.2
    m = read_manifest(tmp_path / "o")
    assert m["task"] == {"type": "sequence-classification", "num_labels": 3, "labels": ["food", "sport", "tech"],
                         "head": ["classifier"]}
    assert m["metrics"]["eval_accuracy"] >= 0.9 and m["metrics"]["eval_loss"] < 0.7
    assert "classifier -> train" in m["spec"] and m["modules"]["classifier"]["action"] == "train"
    assert console.export_text().count("no rule of the spec covers the classification head") == 1
    assert r.model.config.id2label == {0: "food", 1: "sport", 2: "tech"}
    # eval accuracy is what the model does on the held-out rows: recompute it independently
    held = tmp_path / "held.jsonl"
    rows = _rows(72)
    order = torch.randperm(72, generator=torch.Generator().manual_seed(0))[:18].sort().values.tolist()
    _write(held, [rows[i] for i in order])
    acc = evaluate_file(r.model, held, byte_cls_tokenizer(), seq_len=24)["accuracy"]
    assert acc == pytest.approx(m["metrics"]["eval_accuracy"])


def test_head_covered_by_a_rule_is_left_as_written(tiny_bert):
    spec = with_head_rule(tiny_bert, SPEC + "classifier -> lora(r=2)\n")
    assert "added by adapterhub" not in spec.source
    assert head_modules(tiny_bert) == ["classifier"]


def test_reproducible_and_seed_changes_the_head(labelled):
    def state(seed):
        r = train("tiny-bert", SPEC, labelled, steps=3, lr=1e-2, **dict(SMALL, seed=seed))
        return {k: v.detach().clone() for k, v in adapter_state(r.model).items()}

    a, b, c = state(0), state(0), state(1)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["base_model.model.classifier.weight"], c["base_model.model.classifier.weight"])


class Killed(Exception):
    pass


def test_resume_after_kill_equals_uninterrupted(tmp_path, labelled):
    opts = dict(SMALL, steps=6, lr=1e-2, warmup_steps=2, grad_accum=2, eval_split=0.2, save_every=3)
    full = train("tiny-bert", SPEC, labelled, out=tmp_path / "full", **opts)

    def kill(step: int, loss: float) -> None:
        if step == 5:
            raise Killed

    with pytest.raises(Killed):
        train("tiny-bert", SPEC, labelled, out=tmp_path / "cut", on_step=kill, **opts)
    resumed = train("tiny-bert", SPEC, labelled, out=tmp_path / "cut", resume=True, **opts)
    a, b = adapter_state(full.model), adapter_state(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    assert resumed.losses == pytest.approx(full.losses, rel=1e-5)
    for key in ("eval_loss", "eval_accuracy", "tokens"):
        assert resumed.metrics[key] == pytest.approx(full.metrics[key], rel=1e-5)


def test_bundle_reloads_onto_a_fresh_classifier(tmp_path, labelled):
    r = train("tiny-bert", SPEC, labelled, out=tmp_path / "o", steps=4, lr=1e-2, **SMALL)
    fresh = load_classifier("tiny-bert", tmp_path / "o")
    probe = torch.tensor([list(b"milk lion pool"), list(b"rust trust vow")])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=probe).logits, r.model(input_ids=probe).logits)
    assert fresh.config.id2label[2] == "tech"
    adapterhub.save(fresh, tmp_path / "again")  # a re-save keeps the task record
    assert read_manifest(tmp_path / "again")["task"]["labels"] == ["food", "sport", "tech"]
    wrong = adapterhub.build_builtin("tiny-bert")  # two outputs, the bundle has three
    with pytest.raises(AdapterhubError, match=r"sequence classifier with 3 labels .* with 2 outputs; load a "
                                              r"classifier with num_labels=3"):
        adapterhub.load(wrong, tmp_path / "o")
    with pytest.raises(AdapterhubError, match="sequence classifier with 3 labels"):
        adapterhub.load(adapterhub.build_builtin("tiny-llama"), tmp_path / "o")


def test_peft_loads_the_classification_bundle(tmp_path, labelled):
    peft = pytest.importorskip("peft")
    r = train("tiny-bert", SPEC, labelled, out=tmp_path / "o", steps=3, lr=1e-2, **SMALL)
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    base = load_classification_model("tiny-bert", ["food", "sport", "tech"], seed=0)
    torch.nn.init.zeros_(base.classifier.weight)  # the trained head comes from the bundle
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "o")).eval()
    probe = torch.tensor([list(b"milk lion pool"), list(b"rust trust vow")])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=probe).logits, r.model(input_ids=probe).logits)


def test_live_module_must_fit_the_labels(labelled):
    from transformers import BertModel

    with pytest.raises(AdapterhubError, match="has 2 outputs .* 3 labels"):
        train(adapterhub.build_builtin("tiny-bert"), SPEC, labelled, steps=1, **SMALL)
    bare = BertModel(adapterhub.build_builtin("tiny-bert").config)
    with pytest.raises(AdapterhubError, match="BertModel is not a sequence-classification model"):
        train(bare, SPEC, labelled, steps=1, **SMALL)
    model = load_classification_model("tiny-bert", ["food", "sport", "tech"], seed=0)
    r = train(model, SPEC, labelled, steps=2, **SMALL)
    assert r.model is model and len(r.losses) == 2


def _word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ws in WORDS.values() for w in ws})
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", model_input_names=["input_ids", "token_type_ids", "attention_mask"]
                            ).save_pretrained(path)
    return vocab


def test_bare_encoder_directory_keeps_its_weights_and_tokenizer(tmp_path, labelled):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=64)
    torch.manual_seed(5)
    encoder = BertModel(cfg)
    path = tmp_path / "enc"
    encoder.save_pretrained(path)
    assert json.loads((path / "config.json").read_text())["architectures"] == ["BertModel"]
    with pytest.raises(AdapterhubError, match="needs tokenizer files"):
        train(str(path), SPEC, labelled, steps=1, **SMALL)
    vocab = _word_tokenizer(path)
    a = load_classification_model(str(path), ["food", "sport", "tech"], seed=0)
    b = load_classification_model(str(path), ["food", "sport", "tech"], seed=0)
    c = load_classification_model(str(path), ["food", "sport", "tech"], seed=1)
    assert type(a).__name__ == "BertForSequenceClassification" and a.classifier.out_features == 3
    for name, p in encoder.state_dict().items():
        torch.testing.assert_close(a.bert.state_dict()[name], p, rtol=0, atol=0)
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert not torch.equal(a.classifier.weight, c.classifier.weight)
    r = train(str(path), SPEC, labelled, out=tmp_path / "o", steps=2, eval_split=0.25, **SMALL)
    assert 0 <= r.metrics["eval_accuracy"] <= 1
    from adapterhub.train_cls import load_cls_tokenizer

    ids, types = load_cls_tokenizer(path).encode("milk loop", "rust", 16)
    assert ids == [2, vocab["milk"], vocab["loop"], 3, vocab["rust"], 3] and types == [0, 0, 0, 0, 1, 1]
    fresh = load_classifier(str(path), tmp_path / "o")
    probe = torch.tensor([[2, vocab["moon"], 3]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=probe).logits, r.model(input_ids=probe).logits)


# --------------------------------------------------------------------------- CLI


def test_cli_train_and_compare_classification(tmp_path, labelled):
    specs = []
    for stem, text in (("r2", "attn.* -> lora(r=2)"), ("r4", "attn.* -> lora(r=4)")):
        specs.append(tmp_path / f"{stem}.surgery")
        specs[-1].write_text(text + "\n")
    common = ["--model", "tiny-bert", "--data", labelled, "--steps", "3", "--seq-len", "24", "--batch-size", "8"]
    res = CliRunner().invoke(build_cli(), ["train", str(specs[0]), "--out", str(tmp_path / "o"),
                                           "--eval-split", "0.25", *common])
    assert res.exit_code == 0, res.output
    assert "eval accuracy" in res.output and "classification head" in res.output
    res = CliRunner().invoke(build_cli(), ["train", *map(str, specs), "--compare", "--out", str(tmp_path / "cmp"),
                                           *common])
    assert res.exit_code == 0, res.output
    assert "eval accuracy" in res.output
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert all(0 <= r["eval_accuracy"] <= 1 and r["eval_loss"] > 0 for r in rows)
    for r in rows:
        assert read_manifest(tmp_path / "cmp" / r["spec"])["metrics"]["eval_accuracy"] == r["eval_accuracy"]
    res = CliRunner().invoke(build_cli(), ["train", "--help"])
    assert '{"text": ..., "label": ...}' in " ".join(res.output.split())
