"""PEFT's ``task_type`` in ``adapter_config.json``: SEQ_CLS for classification bundles (PEFT then loads them as
``PeftModelForSequenceClassification``), null for causal-LM bundles, every PEFT task type read back, unknown
ones refused."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

import adapterhub
from adapterhub import AdapterhubError
from adapterhub.bundle import read_manifest
from adapterhub.models import build_builtin, builtin_config
from adapterhub.peft_read import TASK_TYPES, spec_from_config
from adapterhub.train_head import load_classification_model, load_classifier, set_task, task_record, with_head_rule
from adapterhub.training import train

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

LABELS = ["food", "sport", "tech"]
SPEC = "attn.* -> lora(r=4, alpha=8)\n"
PROBE = torch.tensor([list(b"milk lion pool"), list(b"rust trust vow")])


def _classifier_bundle(path, spec: str = SPEC, head_rule: bool = True):
    """A tiny-bert classifier with ``spec`` (and its head rule), every trainable tensor moved off its init."""
    model = load_classification_model("tiny-bert", LABELS, seed=0)
    set_task(model, task_record(model, LABELS))
    adapterhub.apply(model, with_head_rule(model, spec) if head_rule else spec, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in adapterhub.trainable_parameters(model):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    adapterhub.save(model.eval(), path)
    return model


def _transformers_classifier(cls_name: str = "BertForSequenceClassification", zero_head: bool = True):
    """The same classifier built by transformers itself from the built-in config and seed 0; its head zeroed
    (a trained head must then come from the adapter)."""
    cfg = builtin_config("tiny-bert")
    cfg.id2label = dict(enumerate(LABELS))
    cfg.label2id = {v: k for k, v in cfg.id2label.items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, cls_name)(cfg).eval()
    if zero_head:
        head = model.classifier if hasattr(model, "classifier") else model.qa_outputs
        torch.nn.init.zeros_(head.weight)
    return model


def _peft(base, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(base, str(path)).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=PROBE).logits


def _config(path) -> dict:
    return json.loads((path / "adapter_config.json").read_text())


def _peft_only(src, dst, **changes):
    """A copy of bundle ``src`` as PEFT would have it (no adapterhub.json), its config updated by ``changes``."""
    dst.mkdir()
    shutil.copy(src / "adapter_model.safetensors", dst)
    (dst / "adapter_config.json").write_text(json.dumps({**_config(src), **changes}))
    return dst


def test_peft_task_types_are_peft_s_own():
    assert sorted(TASK_TYPES) == sorted(t.value for t in peft.TaskType)


def test_classification_bundle_says_seq_cls_and_peft_loads_it_as_a_sequence_classifier(tmp_path):
    model = _classifier_bundle(tmp_path / "b")
    config = _config(tmp_path / "b")
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert config["auto_mapping"] is None  # as PEFT writes it: the task type picks the AutoPeftModel class
    assert read_manifest(tmp_path / "b")["task"]["type"] == "sequence-classification"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid LoraConfig: PEFT warns about nothing
        assert peft.LoraConfig.from_pretrained(str(tmp_path / "b")).task_type == "SEQ_CLS"
    pm = _peft(_transformers_classifier(), tmp_path / "b")
    assert isinstance(pm, peft.PeftModelForSequenceClassification)
    ours = _logits(load_classifier("tiny-bert", tmp_path / "b"))
    torch.testing.assert_close(_logits(pm), ours)
    torch.testing.assert_close(ours, _logits(model))
    assert not torch.allclose(ours, _logits(_transformers_classifier()))  # the trained head and LoRA count


def test_frozen_head_keeps_task_type_null_with_a_note(tmp_path):
    # PEFT's SEQ_CLS model would train (wrap) the frozen head too: the config stays untyped, and still exact
    model = _classifier_bundle(tmp_path / "b", SPEC + "classifier -> freeze\n", head_rule=False)
    config = _config(tmp_path / "b")
    assert config["task_type"] is None and config["modules_to_save"] is None
    assert config["auto_mapping"]["base_model_class"] == "BertForSequenceClassification"
    assert "task_type is null, not SEQ_CLS" in (tmp_path / "b" / "README.md").read_text()
    pm = _peft(_transformers_classifier(zero_head=False), tmp_path / "b")
    torch.testing.assert_close(_logits(pm), _logits(model))


def test_causal_lm_bundle_keeps_task_type_null(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 8)
    r = train("tiny-llama", "attn.{q_proj,v_proj} -> lora(r=2)\n", corpus, out=tmp_path / "o", steps=1,
              seq_len=16, batch_size=2, lr=1e-2, seed=0)
    config = _config(tmp_path / "o")
    assert config["task_type"] is None and "task" not in read_manifest(tmp_path / "o")
    pm = _peft(build_builtin("tiny-llama"), tmp_path / "o")
    assert type(pm) is peft.PeftModel
    ids = torch.tensor([list(b"the lazy fox")])
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=ids).logits, r.model(input_ids=ids).logits)


def test_reader_round_trips_a_seq_cls_config(tmp_path):
    model = _classifier_bundle(tmp_path / "b")
    want = _logits(model)
    # as written (modules_to_save: ["classifier"]) and as a PEFT user may write it (modules_to_save null:
    # PEFT's SEQ_CLS model adds classifier/score itself)
    for name, changes in (("as_written", {}), ("untyped_head", {"modules_to_save": None})):
        d = _peft_only(tmp_path / "b", tmp_path / name, **changes)
        base = _transformers_classifier()
        assert "classifier -> train" in spec_from_config(_config(d), base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a PEFT directory has no fingerprint: load() warns
            ours = _logits(adapterhub.load(base, d))
        torch.testing.assert_close(ours, want)
        torch.testing.assert_close(_logits(_peft(_transformers_classifier(), d)), want)
    # without a task type a null modules_to_save means a frozen head: the adapter's head tensors go unread
    d = _peft_only(tmp_path / "b", tmp_path / "bare", modules_to_save=None, task_type=None)
    assert "classifier" not in spec_from_config(_config(d), _transformers_classifier())


@pytest.mark.parametrize("task", ["CAUSAL_LM", "SEQ_2_SEQ_LM", "FEATURE_EXTRACTION", "TOKEN_CLS", "QUESTION_ANS",
                                  "SEQ_CLS", None])
def test_every_peft_task_type_reads_on_a_causal_lm(tmp_path, task):
    # tiny-llama has no classifier/score/qa_outputs: the task type changes nothing on it
    model = adapterhub.apply(build_builtin("tiny-llama"), "attn.{q_proj,v_proj} -> lora(r=2)\n", seed=0)
    adapterhub.save(model, tmp_path / "b")
    config = {**_config(tmp_path / "b"), "task_type": task}
    plain = spec_from_config({**config, "task_type": None}, build_builtin("tiny-llama"))
    assert spec_from_config(config, build_builtin("tiny-llama")) == plain


def test_token_cls_head_trains_as_peft_s_task_model_trains_it(tmp_path):
    # a real PEFT TOKEN_CLS adapter: its model adds classifier to modules_to_save after matching the targets
    base = _transformers_classifier("BertForTokenClassification", zero_head=False)
    pm = peft.get_peft_model(base, peft.LoraConfig(task_type="TOKEN_CLS", r=2, target_modules=["query", "value"],
                                                   init_lora_weights=False))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.5)
    pm.save_pretrained(str(tmp_path / "t"))
    config = _config(tmp_path / "t")
    config["modules_to_save"] = None  # PEFT wrote the heads it added; the reader must add them itself
    (tmp_path / "t" / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = adapterhub.load(_transformers_classifier("BertForTokenClassification"), tmp_path / "t")
    torch.testing.assert_close(_logits(ours), _logits(pm.eval()))
    # TOKEN_CLS adds its head after matching: a head that is also a target is adapted and trained at once
    clash = {**config, "target_modules": ["query", "classifier"]}
    with pytest.raises(AdapterhubError, match=r"both adapts 'classifier' .* \(modules_to_save, to which "
                                              r"task_type TOKEN_CLS adds classifier, score\)"):
        spec_from_config(clash, _transformers_classifier("BertForTokenClassification"))
    # SEQ_CLS adds it before matching: the head is no target, only trained
    text = spec_from_config({**clash, "task_type": "SEQ_CLS"}, _transformers_classifier())
    assert "classifier -> train" in text and "classifier -> lora" not in text


@pytest.mark.parametrize("value", ["SEQ_CLASSIFICATION", "seq_cls", 3])
def test_unknown_task_type_is_a_clear_error(tmp_path, value):
    _classifier_bundle(tmp_path / "b")
    d = _peft_only(tmp_path / "b", tmp_path / "p", task_type=value)
    if isinstance(value, str):
        with pytest.raises(ValueError, match="Invalid task type"):  # PEFT refuses it too
            peft.LoraConfig.from_pretrained(str(d))
    with pytest.raises(AdapterhubError, match=rf"p/adapter_config.json: task_type {value!r} is not a PEFT task "
                                              r"type \(PEFT defines SEQ_CLS, .*FEATURE_EXTRACTION, or null\)"):
        adapterhub.load(_transformers_classifier(), d)
    with pytest.raises(AdapterhubError, match=rf"the PEFT config: task_type {value!r} is not a PEFT task type"):
        spec_from_config(_config(d), _transformers_classifier())


def test_export_of_a_classifier_says_seq_cls_and_peft_matches(tmp_path):
    """``export --to peft`` of a classification bundle of another variant (DoRA, as LoRA factors of its ΔW)."""
    from adapterhub.export import export_peft

    model = _classifier_bundle(tmp_path / "b", spec="attn.* -> dora(r=4)\n")
    export_peft(tmp_path / "b", tmp_path / "e", rank=64)
    config = _config(tmp_path / "e")
    assert config["task_type"] == "SEQ_CLS" and config["auto_mapping"] is None
    assert config["modules_to_save"] == ["classifier"]
    pm = _peft(_transformers_classifier(), tmp_path / "e")
    assert type(pm).__name__ == "PeftModelForSequenceClassification"
    assert (_logits(pm) - _logits(model)).abs().max().item() < 1e-4


def test_compose_of_classifiers_names_the_head_rule(tmp_path):
    """compose builds the classifier the bundles expect, so its refusal names the head, not the base."""
    from adapterhub.composition import compose

    _classifier_bundle(tmp_path / "a")
    _classifier_bundle(tmp_path / "b", spec="attn.* -> lora(r=2, alpha=8)\n")
    with pytest.raises(AdapterhubError, match="module 'classifier' is a `train` rule"):
        compose([tmp_path / "a", tmp_path / "b"], tmp_path / "c")


def test_streaming_merge_of_a_classifier_says_how_and_the_in_memory_recipe_works(tmp_path):
    from adapterhub.merge_stream import merge_checkpoint

    model = _classifier_bundle(tmp_path / "b")
    with pytest.raises(AdapterhubError, match=r"sequence classifier \(3 labels\).*load_classifier"):
        merge_checkpoint("tiny-bert", tmp_path / "b", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    merged = adapterhub.merge_and_unload(load_classifier("tiny-bert", tmp_path / "b"))
    merged.save_pretrained(tmp_path / "m")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert (_logits(reloaded) - _logits(model)).abs().max().item() < 1e-5
    assert reloaded.config.id2label == dict(enumerate(LABELS))
