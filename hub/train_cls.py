"""Sequence classification for ``adapterhub train`` on encoders (BERT family): data, collate, loss, accuracy.

Data: ``.jsonl``, one ``{"text": str, "label": int | str}`` per line (optionally ``"text_pair": str``).
The label set is the sorted distinct labels of the training file (ints in value order, strings in
string order; one file uses one type); label ``k`` of that list is class index ``k``. Texts are
tokenized once (the model directory's tokenizer with its special tokens, truncated to ``seq_len``;
the built-in models' byte tokenizer: the UTF-8 bytes, ``BYTE_SEP`` between text and pair) and padded
with ``pad_id`` (attention mask 0). A micro-batch is a pure function of (seed, index), as for the LM
(:class:`adapterhub.train_data.Dataset`), cut to its longest row. Loss: mean cross-entropy of the
logits; eval: mean cross-entropy and accuracy (argmax == label) over the held-out examples.

The model and its head live in :mod:`adapterhub.train_head`.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.registry import AdapterhubError

from .train_data import batch_rows

BYTE_SEP = 257  # the built-in byte vocabulary's eos id, put between text and text_pair
Label = int | str
DATA_HELP = '{"text": ..., "label": ...} per line (optionally "text_pair")'


@dataclass(frozen=True)
class Example:
    text: str
    pair: str | None
    label: Label
    line: int


def read_labeled(path: str | Path) -> list[Example]:
    """The examples of a classification ``.jsonl`` file, with file:line errors for bad lines."""
    path = Path(path)
    if not path.is_file():
        raise AdapterhubError(f"training data '{path}' does not exist")
    if path.suffix != ".jsonl":
        raise AdapterhubError(f"training data '{path}': a classification model (an encoder) needs a .jsonl file "
                              f"with {DATA_HELP}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterhubError(f"training data '{path}' is not UTF-8 text: {exc}") from None
    out: list[Example] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AdapterhubError(f"{path}:{n}: not valid JSON ({exc})") from None
        out.append(_example(obj, f"{path}:{n}", n))
    if not out:
        raise AdapterhubError(f"training data '{path}' has no examples")
    kinds = {type(e.label) for e in out}
    if len(kinds) > 1:
        first = out[0]
        odd = next(e for e in out if type(e.label) is not type(first.label))
        raise AdapterhubError(f"{path}:{odd.line}: label {odd.label!r} is a {type(odd.label).__name__}, but line "
                              f"{first.line} has a {type(first.label).__name__} label; use one type for all labels")
    return out


def _example(obj: Any, where: str, line: int) -> Example:
    if not isinstance(obj, dict):
        raise AdapterhubError(f"{where}: expected an object {DATA_HELP}")
    if "label" not in obj:
        if "prompt" in obj or "response" in obj:
            raise AdapterhubError(f"{where}: prompt/response data trains a causal LM; a classification model "
                                  f"(an encoder) needs {DATA_HELP}")
        raise AdapterhubError(f"{where}: missing \"label\": a classification model needs {DATA_HELP}")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, (int, str)) or label == "":
        raise AdapterhubError(f"{where}: \"label\" must be an int or a non-empty string, got {json.dumps(label)}")
    text = obj.get("text")
    if not isinstance(text, str):
        what = "missing" if text is None else f"a {type(text).__name__}, not a string"
        raise AdapterhubError(f"{where}: \"text\" is {what}; expected {DATA_HELP}")
    pair = obj.get("text_pair")
    if pair is not None and not isinstance(pair, str):
        raise AdapterhubError(f"{where}: \"text_pair\" must be a string, got {type(pair).__name__}")
    return Example(text, pair, label, line)


def label_set(examples: list[Example]) -> list[Label]:
    """Sorted distinct labels; at least two."""
    labels = sorted({e.label for e in examples})  # type: ignore[type-var]
    if len(labels) < 2:
        raise AdapterhubError(f"the training data has {len(labels)} distinct label(s) ({labels}); a classifier "
                              "needs at least two")
    return labels


# --------------------------------------------------------------------------- tokenizing


@dataclass
class ClsTokenizer:
    """``encode(text, pair, max_len) -> (ids, token_type_ids)``; ``pad_id`` fills the batches."""

    encode: Callable[[str, str | None, int], tuple[list[int], list[int]]]
    pad_id: int
    name: str


def byte_cls_tokenizer() -> ClsTokenizer:
    """The built-in models' tokenizer: UTF-8 bytes, ``BYTE_SEP`` before the pair, pad id 0."""
    def encode(text: str, pair: str | None, max_len: int) -> tuple[list[int], list[int]]:
        a = list(text.encode("utf-8"))
        if pair is None:
            return a[:max_len], [0] * min(len(a), max_len)
        b = list(pair.encode("utf-8"))
        while len(a) + len(b) + 1 > max_len and (a or b):  # longest first, as transformers truncates
            (a if len(a) >= len(b) else b).pop()
        return a + [BYTE_SEP] + b, [0] * (len(a) + 1) + [1] * len(b)
    return ClsTokenizer(encode, 0, "bytes")


def hf_cls_tokenizer(tok: Any) -> ClsTokenizer:
    """A transformers tokenizer with its special tokens ([CLS] ... [SEP]), truncation longest-first."""
    def encode(text: str, pair: str | None, max_len: int) -> tuple[list[int], list[int]]:
        try:
            enc = tok(text, pair, truncation=True, max_length=max_len)
        except Exception as exc:
            raise AdapterhubError(f"the tokenizer failed on {text[:40]!r} with --seq-len {max_len}: "
                                  f"{str(exc).splitlines()[0][:200]}") from None
        ids = list(enc["input_ids"])
        return ids, list(enc.get("token_type_ids") or [0] * len(ids))
    pad = getattr(tok, "pad_token_id", None)
    return ClsTokenizer(encode, 0 if pad is None else int(pad), type(tok).__name__)


def cls_tokenizer(tokenizer: Any) -> ClsTokenizer:
    """Wrap what ``train(tokenizer=...)`` was given: a ClsTokenizer, a train_data Tokenizer, or transformers'."""
    from .train_data import Tokenizer

    if isinstance(tokenizer, ClsTokenizer):
        return tokenizer
    if isinstance(tokenizer, Tokenizer):
        if tokenizer.name == "bytes":
            return byte_cls_tokenizer()

        def encode(text: str, pair: str | None, max_len: int) -> tuple[list[int], list[int]]:
            a = tokenizer.encode(text)
            b = tokenizer.encode(pair) if pair is not None else []
            ids = (a + b)[:max_len]
            return ids, ([0] * len(a) + [1] * len(b))[:max_len]
        return ClsTokenizer(encode, 0, tokenizer.name)
    return hf_cls_tokenizer(tokenizer)


def load_cls_tokenizer(path: str | Path) -> ClsTokenizer:
    """``AutoTokenizer`` of a model directory, with a clear error when there is none."""
    from .train_data import auto_tokenizer

    return hf_cls_tokenizer(auto_tokenizer(path))


PACKED = ("input_ids", "attention_mask", "token_type_ids")  # the channels of a packed batch, in order


def encode_examples(examples: list[Example], labels: list[Label], tok: ClsTokenizer, seq_len: int,
                    where: str = "the data") -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed, labels)``: ``packed`` ``[n, 3, longest]`` holds the :data:`PACKED` channels (ids padded with
    ``pad_id``, attention mask, token types); ``labels`` ``[n]`` the class indices."""
    index = {label: i for i, label in enumerate(labels)}
    rows, types, ys = [], [], []
    for e in examples:
        if e.label not in index:
            raise AdapterhubError(f"{where}:{e.line}: label {e.label!r} is not one of the trained labels "
                                  f"{labels}")
        ids, tt = tok.encode(e.text, e.pair, seq_len)
        if not ids:
            raise AdapterhubError(f"{where}:{e.line}: the text encodes to no tokens")
        rows.append(ids[:seq_len])
        types.append(tt[:seq_len])
        ys.append(index[e.label])
    packed = torch.zeros(len(rows), len(PACKED), max(len(r) for r in rows), dtype=torch.long)
    packed[:, 0] = tok.pad_id
    for i, (r, tt) in enumerate(zip(rows, types)):
        packed[i, 0, :len(r)] = torch.tensor(r)
        packed[i, 1, :len(r)] = 1
        packed[i, 2, :len(tt)] = torch.tensor(tt)
    return packed, torch.tensor(ys, dtype=torch.long)


def _take(packed: torch.Tensor, labels: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows ``rows``, cut to the longest one's length."""
    width = max(1, int(packed[rows, 1].sum(-1).max())) if len(rows) else 1
    return packed[rows, :, :width], labels[rows]


def count_tokens(packed: torch.Tensor) -> int:
    """Real (unpadded) tokens in a packed batch."""
    return int(packed[:, 1].sum())


@dataclass
class ClsDataset:
    """Encoded train/eval examples and the order the training batches are drawn in."""

    train_packed: torch.Tensor
    train_labels: torch.Tensor
    eval_packed: torch.Tensor
    eval_labels: torch.Tensor
    labels: list[Label]
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.train_labels) // self.batch_size)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(packed, labels)`` of the ``index``-th micro-batch (a pure function of index and seed: resumable)."""
        rows = batch_rows(index, len(self.train_labels), self.batch_size, self.seed)
        return _take(self.train_packed, self.train_labels, rows)

    def tokens(self, packed: torch.Tensor) -> int:
        return count_tokens(packed)

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return _chunks(self.eval_packed, self.eval_labels, self.batch_size)


def _chunks(packed: torch.Tensor, labels: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    n = len(labels)
    return [_take(packed, labels, torch.arange(i, min(n, i + size))) for i in range(0, n, size)]


def build_cls_dataset(examples: list[Example], labels: list[Label], tok: ClsTokenizer, *, seq_len: int,
                      batch_size: int, eval_split: float, seed: int, where: str = "the data") -> ClsDataset:
    """Encode ``examples``; hold out ``eval_split`` of them (seeded) for eval loss and accuracy."""
    if not 0 <= eval_split < 1:
        raise AdapterhubError(f"--eval-split must be in [0, 1), got {eval_split}")
    packed, ys = encode_examples(examples, labels, tok, seq_len, where)
    n = len(examples)
    n_eval = 0 if eval_split == 0 else max(1, round(n * eval_split))
    if n - n_eval < 1:
        raise AdapterhubError(f"the training data has {n} examples: too few to hold out --eval-split {eval_split}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ev, tr = order[:n_eval].sort().values, order[n_eval:]
    return ClsDataset(packed[tr], ys[tr], packed[ev], ys[ev], labels, min(batch_size, len(tr)), seed)


# --------------------------------------------------------------------------- loss and accuracy


def _accepts_token_types(model: nn.Module) -> bool:
    inner = getattr(model, "module", model)  # DDP keeps the model as .module
    try:
        return "token_type_ids" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def cls_logits(model: nn.Module, packed: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """The float32 logits ``[batch, num_labels]`` of a packed batch (on the model's device)."""
    inputs = {"input_ids": packed[:, 0], "attention_mask": packed[:, 1]}
    if _accepts_token_types(model):
        inputs["token_type_ids"] = packed[:, 2]
    dev = packed.device.type
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and dev == "cpu"), \
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and dev == "cuda"):
        out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def cls_loss(model: nn.Module, packed: torch.Tensor, labels: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the batch's logits against ``labels`` (same signature as the LM loss)."""
    return F.cross_entropy(cls_logits(model, packed, bf16), labels)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     bf16: bool = False) -> dict[str, float]:
    """``{"eval_loss": mean cross-entropy, "eval_accuracy": share of argmax == label}``; {} without batches."""
    if not batches:
        return {}
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, correct, count = 0.0, 0, 0
    for packed, y in batches:
        logits = cls_logits(model, packed.to(device), bf16)
        y = y.to(device)
        total += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += len(y)
    model.train(was)
    return {"eval_loss": total / count, "eval_accuracy": correct / count}


def evaluate_file(model: nn.Module, path: str | Path, tokenizer: Any, labels: list[Label] | None = None, *,
                  seq_len: int = 128, batch_size: int = 32) -> dict[str, float]:
    """``{"loss", "accuracy", "examples"}`` of a classifier on a labelled ``.jsonl`` file; ``labels``: the
    class order (default: the labels the model was trained on)."""
    from .train_head import task_of

    if labels is None:
        task = task_of(model)
        if task is None:
            raise AdapterhubError("pass labels=[...]: this model carries no trained label set")
        labels = task["labels"]
    packed, ys = encode_examples(read_labeled(path), labels, cls_tokenizer(tokenizer), seq_len, str(path))
    out = evaluate_batches(model, _chunks(packed, ys, batch_size))
    return {"loss": out["eval_loss"], "accuracy": out["eval_accuracy"], "examples": len(ys)}


# --------------------------------------------------------------------------- the run's setup


def prepare(model: str | nn.Module, spec: Any, data: str | Path, *, tokenizer: Any, seq_len: int, batch_size: int,
            eval_split: float, seed: int, console: Any = None) -> tuple[nn.Module, ClsDataset, Any]:
    """``(model, dataset, spec)`` of a classification run: the labelled data read, the classifier loaded
    (or checked), the examples encoded and split, ``spec`` extended so that the head trains."""
    from .models import BYTE_VOCAB, resolve_source
    from .train_head import check_classifier, load_classification_model, set_task, task_record, with_head_rule

    examples = read_labeled(data)
    labels = label_set(examples)
    if isinstance(model, nn.Module):
        check_classifier(model, labels)
        module = model
    else:
        module = load_classification_model(model, labels, seed)
    if tokenizer is None:
        if isinstance(model, str):
            src = resolve_source(model)
            tokenizer = byte_cls_tokenizer() if src.kind == "builtin" else load_cls_tokenizer(src.path)
        elif getattr(getattr(module, "config", None), "vocab_size", None) == BYTE_VOCAB:
            tokenizer = byte_cls_tokenizer()
        else:
            raise AdapterhubError("pass tokenizer=... : this model is not a built-in byte-level model")
    dataset = build_cls_dataset(examples, labels, cls_tokenizer(tokenizer), seq_len=seq_len, batch_size=batch_size,
                                eval_split=eval_split, seed=seed, where=str(data))
    spec = with_head_rule(module, spec, console)
    set_task(module, task_record(module, labels))
    return module, dataset, spec
