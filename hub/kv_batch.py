"""The key/value cache of a running batch of sequences with different lengths (left padded).

Row ``b`` of the batch holds ``n_b`` real tokens right-aligned in ``L`` columns; ``mask[b, j]`` is 1 for a
real token and 0 for padding, and the next token of row ``b`` sits at position ``n_b`` (``positions[b]``).
With the mask passed as ``attention_mask`` and explicit ``position_ids``, a padded row attends to exactly the
keys and uses exactly the rotary/learned positions it would have alone, so its logits are those of the
unpadded sequence (up to float summation order).

Rows join (:meth:`KVBatch.merge`: both sides left-padded to a common length, concatenated along the batch)
and leave (:meth:`KVBatch.select`: kept rows only, then leading columns that are padding in every kept row
are cut). The tensors live in the transformers ``DynamicCache`` the model returned, one ``DynamicLayer``
per decoder layer holding ``keys``/``values`` of shape ``[batch, kv_heads, L, head_dim]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from adapterhub.registry import AdapterhubError


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, mask)`` of ``prompts`` right-aligned in ``max(len)`` columns (padding: ``pad_id``, mask 0)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        if p:
            ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = 1
    return ids, mask


def positions_of(mask: torch.Tensor) -> torch.Tensor:
    """Position id of every column: the count of real tokens before it (0 on padding)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise AdapterhubError(f"the model returned a {type(cache).__name__} as its cache; generation needs a "
                              "transformers Cache with per-layer keys/values (transformers >= 4.56)")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise AdapterhubError(f"cache layer {type(layer).__name__} is not supported for mixed batches "
                                  "(sliding-window and non-attention caches cannot be left padded)")
    return list(layers)


def _pad_left(t: torch.Tensor, extra: int) -> torch.Tensor:
    """``t`` with ``extra`` zero columns prepended on the sequence dimension (-2)."""
    return t if extra == 0 else F.pad(t, (0, 0, extra, 0))


class KVBatch:
    """A left-padded batch: the model's cache, the attention mask ``[B, L]`` and next positions ``[B]``."""

    def __init__(self, cache: Any, mask: torch.Tensor):
        self.cache = cache
        self.mask = mask
        self.positions = mask.sum(-1)
        _cache_layers(cache)

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]

    def decode_inputs(self, last_ids: torch.Tensor) -> dict[str, Any]:
        """Model inputs for one new token per row: ``last_ids`` ``[B]`` at each row's next position."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.size, 1))], dim=1)
        return {"input_ids": last_ids.view(-1, 1), "attention_mask": self.mask,
                "position_ids": self.positions.view(-1, 1), "past_key_values": self.cache}

    def advanced(self, cache: Any) -> None:
        """Record the forward that consumed :meth:`decode_inputs`: the cache grew by one column."""
        self.cache = cache
        self.positions = self.positions + 1

    def _check(self) -> None:
        for layer in _cache_layers(self.cache):
            if layer.keys is not None and layer.keys.numel() and layer.keys.shape[-2] != self.length:
                raise AdapterhubError(f"cache length {layer.keys.shape[-2]} != mask length {self.length}")

    def merge(self, other: KVBatch) -> None:
        """Append ``other``'s rows after this batch's rows (both left-padded to the longer length)."""
        self._check()
        other._check()
        width = max(self.length, other.length)
        ours, theirs = _cache_layers(self.cache), _cache_layers(other.cache)
        if len(ours) != len(theirs):
            raise AdapterhubError(f"cannot merge caches of {len(ours)} and {len(theirs)} layers")
        for a, b in zip(ours, theirs):
            a.keys = torch.cat([_pad_left(a.keys, width - self.length), _pad_left(b.keys, width - other.length)])
            a.values = torch.cat([_pad_left(a.values, width - self.length),
                                  _pad_left(b.values, width - other.length)])
        self.mask = torch.cat([F.pad(self.mask, (width - self.length, 0)),
                               F.pad(other.mask, (width - other.length, 0))])
        self.positions = torch.cat([self.positions, other.positions])

    def select(self, rows: Sequence[int]) -> None:
        """Keep ``rows`` (in that order) and cut the leading columns that are padding in all of them."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        used = mask.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else mask.shape[1]
        self.mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        for layer in _cache_layers(self.cache):
            if layer.keys is None or not layer.keys.numel():
                continue
            dev = layer.keys.device
            layer.keys = layer.keys.index_select(0, index.to(dev))[:, :, start:].contiguous()
            layer.values = layer.values.index_select(0, index.to(dev))[:, :, start:].contiguous()
