"""Training data for ``adapterhub train``: reading, tokenizing, packing and batching.

Inputs: a ``.txt`` corpus (the whole file is one text), or ``.jsonl`` with one object per line,
either ``{"text": ...}`` or ``{"prompt": ..., "response": ...}`` (loss on the response tokens only:
the prompt's labels are ``-100``). Examples are tokenized, joined with the tokenizer's EOS token (when
it has one) and cut into fixed-length packed sequences of ``seq_len`` tokens (the tail that does not
fill a sequence is dropped). The built-in models use a byte-level tokenizer: ``list(text.encode())``.
Labelled data (``{"text": ..., "label": ...}``) is for encoders: see :mod:`adapterhub.train_cls`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adapterhub.registry import AdapterhubError

IGNORE = -100


@dataclass
class Tokenizer:
    """Text -> token ids, and the id put between packed examples (None: nothing)."""

    encode: Callable[[str], list[int]]
    eos_id: int | None
    name: str


def byte_tokenizer() -> Tokenizer:
    """The built-in models' tokenizer: the UTF-8 bytes of the text."""
    return Tokenizer(lambda text: list(text.encode("utf-8")), None, "bytes")


def hf_tokenizer(tok: Any) -> Tokenizer:
    """Wrap a transformers tokenizer (no special tokens added per example)."""
    return Tokenizer(lambda text: list(tok(text, add_special_tokens=False)["input_ids"]),
                     getattr(tok, "eos_token_id", None), type(tok).__name__)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model")


def auto_tokenizer(path: str | Path) -> Any:
    """transformers' ``AutoTokenizer`` of a model directory; a clear error when the directory has no tokenizer
    files (transformers would otherwise make an empty-vocabulary tokenizer from config.json alone)."""
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in TOKENIZER_FILES):
        raise AdapterhubError(f"could not load a tokenizer from '{path}' (none of {', '.join(TOKENIZER_FILES)}); "
                              "the model directory needs tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise AdapterhubError(f"could not load a tokenizer from '{path}' ({str(exc).splitlines()[0][:200]}); "
                              "the model directory needs tokenizer files") from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """``AutoTokenizer`` from a model directory, with a clear error when there is none."""
    return hf_tokenizer(auto_tokenizer(path))


def read_examples(path: str | Path) -> list[tuple[str, str]]:
    """``(prompt, text)`` pairs; the loss covers ``text`` only (``prompt`` is empty for plain text)."""
    path = Path(path)
    if not path.is_file():
        raise AdapterhubError(f"training data '{path}' does not exist")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AdapterhubError(f"training data '{path}' is not UTF-8 text: {exc}") from None
    if path.suffix == ".txt":
        if not raw.strip():
            raise AdapterhubError(f"training data '{path}' is empty")
        return [("", raw)]
    if path.suffix != ".jsonl":
        raise AdapterhubError(f"training data '{path}': expected a .txt or .jsonl file")
    out: list[tuple[str, str]] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise AdapterhubError(f"{path}:{n}: not valid JSON ({exc})") from None
        if isinstance(obj, dict) and "label" in obj:
            raise AdapterhubError(f"{path}:{n}: a \"label\" field: labelled data trains a classifier (an encoder "
                                  "such as BERT), but this model is a causal LM; give {\"text\": ...} or "
                                  "{\"prompt\": ..., \"response\": ...} lines")
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            out.append(("", obj["text"]))
        elif isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
            out.append((obj["prompt"], obj["response"]))
        else:
            raise AdapterhubError(f"{path}:{n}: expected an object with a string \"text\", or string \"prompt\" "
                                  "and \"response\" fields")
    if not out:
        raise AdapterhubError(f"training data '{path}' has no examples")
    return out


def pack(examples: list[tuple[str, str]], tokenizer: Tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)``, each ``[n_sequences, seq_len]``: examples joined and cut into sequences."""
    ids: list[int] = []
    labels: list[int] = []
    for prompt, text in examples:
        p = tokenizer.encode(prompt) if prompt else []
        t = tokenizer.encode(text)
        if tokenizer.eos_id is not None:
            t = t + [tokenizer.eos_id]
        ids += p + t
        labels += [IGNORE] * len(p) + t
    n = len(ids) // seq_len
    if n == 0:
        raise AdapterhubError(f"the training data has {len(ids)} tokens: fewer than one sequence of --seq-len "
                              f"{seq_len}; give more data or a smaller --seq-len")
    shape = (n, seq_len)
    return (torch.tensor(ids[:n * seq_len], dtype=torch.long).view(shape),
            torch.tensor(labels[:n * seq_len], dtype=torch.long).view(shape))


def batch_rows(index: int, n: int, batch_size: int, seed: int) -> torch.Tensor:
    """Rows of the ``index``-th micro-batch over ``n`` training rows: each epoch a fresh permutation
    seeded by ``(seed, epoch)``, cut into ``n // batch_size`` batches (the tail is dropped)."""
    epoch, k = divmod(index, max(1, n // batch_size))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[k * batch_size:(k + 1) * batch_size]


@dataclass
class Dataset:
    """Packed train/eval sequences and the order the training batches are drawn in."""

    train_ids: torch.Tensor
    train_labels: torch.Tensor
    eval_ids: torch.Tensor
    eval_labels: torch.Tensor
    batch_size: int
    seed: int

    @property
    def batches_per_epoch(self) -> int:
        return max(1, len(self.train_ids) // self.batch_size)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``index``-th micro-batch of the run (a pure function of index and seed: resumable)."""
        rows = batch_rows(index, len(self.train_ids), self.batch_size, self.seed)
        return self.train_ids[rows], self.train_labels[rows]

    def tokens(self, ids: torch.Tensor) -> int:
        """Tokens in a micro-batch (every position of a packed sequence is a real token)."""
        return ids.numel()

    def eval_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n, b = len(self.eval_ids), self.batch_size
        return [(self.eval_ids[i:i + b], self.eval_labels[i:i + b]) for i in range(0, n, b)]


def build_dataset(path: str | Path, tokenizer: Tokenizer, *, seq_len: int, batch_size: int,
                  eval_split: float, seed: int) -> Dataset:
    """Read, tokenize and pack ``path``; hold out ``eval_split`` of the sequences (seeded) for eval."""
    if not 0 <= eval_split < 1:
        raise AdapterhubError(f"--eval-split must be in [0, 1), got {eval_split}")
    ids, labels = pack(read_examples(path), tokenizer, seq_len)
    n_eval = 0 if eval_split == 0 else max(1, round(len(ids) * eval_split))
    if len(ids) - n_eval < 1:
        raise AdapterhubError(f"the training data packs into {len(ids)} sequences of {seq_len} tokens: too few "
                              f"to hold out --eval-split {eval_split}; give more data or a smaller --seq-len")
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))
    ev, tr = order[:n_eval], order[n_eval:]
    return Dataset(ids[tr], labels[tr], ids[ev], labels[ev], min(batch_size, len(tr)), seed)
