"""Safetensors checkpoints read and written one tensor at a time (for :mod:`adapterhub.merge_stream`).

:class:`Checkpoint` reads ``model.safetensors`` or an index + shards: the headers up front (names,
dtypes, shapes, offsets), then each tensor through its own ``safe_open`` -- a handle kept open over a
whole file keeps every page of it that was read mapped into the process (its RSS grows to the file's
size); one per tensor keeps only that tensor. :func:`write_safetensors` writes the format directly
(8-byte header length, JSON header padded to 8 bytes, the tensors' bytes in header order) asking for
one tensor at a time, so a shard is never assembled in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapterhub.registry import AdapterhubError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
BY_NAME = {v: k for k, v in DTYPES.items()}


class Checkpoint:
    """A safetensors checkpoint directory read one tensor at a time."""

    def __init__(self, path: Path):
        from .models import read_safetensors_header

        self.path = Path(path)
        self.index: dict[str, Any] | None = None
        if (self.path / INDEX).is_file():
            try:
                self.index = json.loads((self.path / INDEX).read_text())
            except ValueError as exc:
                raise AdapterhubError(f"{self.path / INDEX} is not valid JSON: {exc}") from None
            self.weight_map: dict[str, str] = dict(self.index["weight_map"])
        elif (self.path / SINGLE).is_file():
            self.weight_map = {}
        else:
            raise AdapterhubError(f"'{self.path}' has neither {INDEX} nor {SINGLE}: adapterhub merge reads "
                                  "safetensors checkpoints only")
        files = sorted(set(self.weight_map.values())) if self.index else [SINGLE]
        self.headers: dict[str, dict[str, Any]] = {}
        for f in files:
            self.headers[f] = read_safetensors_header(self.path / f)
            if self.index is None:
                self.weight_map.update(dict.fromkeys(self.headers[f], f))
        self.files = files

    def keys_of(self, file: str) -> list[str]:
        """The tensors of ``file`` in their order in the file."""
        header = self.headers[file]
        return sorted(header, key=lambda k: header[k]["data_offsets"][0])

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read through its own ``safe_open`` (nothing else of the file stays mapped)."""
        from safetensors import safe_open

        with safe_open(str(self.path / self.weight_map[key]), framework="pt") as f:
            return f.get_tensor(key)

    def key_for(self, name: str, prefix: str) -> str | None:
        """The checkpoint key of a model parameter name (seeing through ``base_model_prefix``)."""
        if name in self.weight_map:
            return name
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in self.weight_map:
            return name[len(prefix) + 1:]
        if prefix and f"{prefix}.{name}" in self.weight_map:
            return f"{prefix}.{name}"
        return None


def write_safetensors(path: Path, header: dict[str, Any], keys: list[str], produce: Callable[[str], torch.Tensor],
                      metadata: dict[str, str] | None, advance: Callable[[int], None]) -> int:
    """Write a safetensors file tensor by tensor (``produce(key)`` gives each; only one is held);
    dtypes and shapes are the source header's. Returns the largest tensor's byte count."""
    entries: dict[str, Any] = {}
    offset = 0
    for k in keys:
        meta = header[k]
        n = meta["data_offsets"][1] - meta["data_offsets"][0]
        entries[k] = {"dtype": meta["dtype"], "shape": meta["shape"], "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        entries["__metadata__"] = metadata
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    largest = 0
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for k in keys:
            t = produce(k)
            meta = entries[k]
            if DTYPES.get(t.dtype) != meta["dtype"] or list(t.shape) != list(meta["shape"]):
                raise AdapterhubError(f"internal error: tensor {k} became {t.dtype} {list(t.shape)}, the checkpoint "
                                      f"has {meta['dtype']} {meta['shape']}")
            data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            largest = max(largest, data.nbytes)
            advance(data.nbytes)
            del t, data
        f.flush()
        os.fsync(f.fileno())
    return largest


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def file_metadata(path: Path) -> dict[str, str] | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()
