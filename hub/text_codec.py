"""Text <-> token ids for a ``--model`` argument.

The built-in models (``tiny-llama`` ...) read UTF-8 bytes: token ``i < 256`` is byte ``i``; ids 256..259 are
special tokens (bos, eos, pad, unk) that decode to nothing. Invalid UTF-8 decodes with replacement
characters. Model directories and Hub ids use their ``AutoTokenizer`` (no special tokens added when
encoding; special tokens skipped when decoding) and its ``eos_token_id``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from adapterhub.registry import AdapterhubError


@dataclass
class TextCodec:
    """``encode(text) -> ids`` and ``decode(ids) -> text`` for one model; ``eos_id`` ends generation."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int | None
    name: str


def byte_codec() -> TextCodec:
    """The built-in models' codec: UTF-8 bytes (see the module docstring)."""
    def decode(ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    return TextCodec(lambda text: list(text.encode("utf-8")), decode, None, "bytes")


def hf_codec(tokenizer) -> TextCodec:
    """Wrap a transformers tokenizer."""
    def encode(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return TextCodec(encode, decode, getattr(tokenizer, "eos_token_id", None), type(tokenizer).__name__)


def text_codec(model_arg: str) -> TextCodec:
    """The codec of ``--model`` ``model_arg`` (a built-in name, a model directory or a Hub id in the cache)."""
    from .models import resolve_source

    src = resolve_source(model_arg)
    if src.kind == "builtin":
        return byte_codec()
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src.path))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise AdapterhubError(f"could not load a tokenizer for '{model_arg}' from '{src.path}' ({reason}); "
                              "the model directory needs tokenizer files (tokenizer.json or similar)") from None
    return hf_codec(tok)
