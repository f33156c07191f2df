"""Shared machinery of the virtual-token variants ``prefix`` and ``prompt``.

Both add ``p`` positions the user never typed: prefix tuning ``p`` key/value entries per layer (held in
a transformers ``Cache``), prompt tuning ``p`` input embeddings. Neither is a change of any weight, so
their layers work through hooks on the whole model (``ApplyContext.model``): a forward pre-hook that
rewrites the call's arguments and, for ``prompt``, a forward hook that trims the outputs.

Conventions shared by both hooks (transformers decoder models, Llama and GPT-2 families):

* ``attention_mask`` (2-D, ``batch x length``) gets ``p`` ones on the left;
* ``position_ids``, when given, are shifted by ``p``: the user's tokens sit at positions ``p, p+1, ...``,
  exactly what the model computes itself when no ``position_ids`` are given (it counts the cache);
* a *fresh* call (no cache, or a cache that holds only prefix entries) gets the virtual tokens; a call
  that continues a cache (``generate`` after its first step) does not -- the cache already has them.

A cache filled by ``prefix`` is marked with :data:`PREFIX_MARK` (its number of prefix entries), so both
hooks can tell "only the prefix so far" from "a continued sequence", whichever hook runs first.
"""

from __future__ import annotations

import inspect
import itertools
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from adapterhub.registry import AdapterhubError, AdapterLayer, ModuleTypeError, NotMergeableError

#: attribute set on a transformers ``Cache`` that holds prefix entries: how many of them
PREFIX_MARK = "adapterhub_prefix_tokens"


def call_arguments(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of one ``model(...)`` call by name (positional ones bound via ``forward``'s signature)."""
    if not args:
        return dict(kwargs)
    sig = inspect.signature(model.forward)
    try:
        bound = sig.bind_partial(*args, **kwargs)
    except TypeError as exc:
        raise AdapterhubError(f"cannot read the arguments of {type(model).__name__}.forward: {exc}") from None
    out = dict(bound.arguments)
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD and name in out:
            out.update(out.pop(name))
        elif p.kind is inspect.Parameter.VAR_POSITIONAL and out.get(name):
            raise AdapterhubError(f"{type(model).__name__}.forward got unexpected positional arguments")
    return out


def cache_length(cache: Any) -> int:
    """Tokens already held by ``past_key_values`` (0 for none)."""
    if cache is None:
        return 0
    if not hasattr(cache, "get_seq_length"):
        raise AdapterhubError("past_key_values must be a transformers Cache (e.g. DynamicCache), "
                              f"got {type(cache).__name__}")
    return int(cache.get_seq_length())


def prefix_length(cache: Any) -> int:
    """Prefix entries a ``prefix`` layer put into ``cache`` (0 for none)."""
    return int(getattr(cache, PREFIX_MARK, 0)) if cache is not None else 0


def is_fresh(cache: Any) -> bool:
    """True when the call starts a sequence: the cache holds nothing, or only prefix entries."""
    return cache_length(cache) == prefix_length(cache)


def batch_and_device(kw: dict[str, Any], variant: str) -> tuple[int, torch.device]:
    """Batch size and device of the call, from ``input_ids`` or ``inputs_embeds``."""
    x = kw.get("input_ids")
    if x is None:
        x = kw.get("inputs_embeds")
    if x is None:
        raise AdapterhubError(f"{variant}: the model was called without input_ids or inputs_embeds")
    return (x.shape[0] if x.ndim > 1 else 1), x.device


def extend_mask(mask: torch.Tensor | None, n: int, variant: str) -> torch.Tensor | None:
    """``mask`` with ``n`` ones on the left (the virtual positions are always visible)."""
    if mask is None:
        return None
    if mask.ndim != 2:
        raise AdapterhubError(f"{variant}: attention_mask must be 2-D (batch x length) so that the {n} "
                              f"virtual positions can be added; got shape {tuple(mask.shape)}")
    return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)


def shift_positions(positions: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """``position_ids + n`` (the user's tokens come after ``n`` virtual positions)."""
    return None if positions is None else positions + n


def require_decoder(model: nn.Module | None, variant: str, name: str) -> nn.Module:
    """``model`` if it is a decoder (causal self-attention), else a :class:`ModuleTypeError`."""
    if model is None:
        raise ModuleTypeError(f"{variant} cannot wrap module '{name}': it needs the whole model "
                              "(ApplyContext.model) to install its hooks")
    flags = [m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)]
    if not any(flags):
        raise ModuleTypeError(
            f"{variant} cannot wrap module '{name}' of {type(model).__name__}: {variant} tuning supports "
            "decoder (causal) language models such as Llama and GPT-2, and this model has no causal "
            "self-attention")
    return model


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point tensor (float32 if it has none)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def not_mergeable(variant: str, why: str) -> NotMergeableError:
    return NotMergeableError(f"{variant} tuning cannot be merged into the base weights: {why}")


class VirtualTokenLayer(AdapterLayer):
    """An adapter layer that acts through hooks on the whole model (see the module docstring).

    Subclasses implement :meth:`pre_hook` (rewrite the call's arguments) and may implement
    :meth:`post_hook` (rewrite its output); both run only while the layer is not ``disabled``.
    """

    #: why the variant has no weight-space form (for the merge error)
    merge_reason = ""

    def __init__(self, base_layer: nn.Module, attached: bool = False):
        super().__init__(base_layer, attached=attached)
        self._handles: list[RemovableHandle] = []
        self.tokens = 0

    def install_hooks(self, model: nn.Module) -> None:
        """Register this layer's hooks on ``model`` (the model the user calls)."""
        self.remove_hooks()
        self._handles = [model.register_forward_pre_hook(self._on_call, with_kwargs=True),
                         model.register_forward_hook(self._on_return, always_call=True)]

    def remove_hooks(self) -> None:
        """Take the hooks off the model again (the model then runs as the base model)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _on_call(self, model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):
        if self.disabled:
            return None
        kw = call_arguments(model, args, kwargs)
        return (), self.pre_hook(model, kw)

    def _on_return(self, model: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        return self.post_hook(model, output)  # also after a failed call (output None): resets state

    def pre_hook(self, model: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def post_hook(self, model: nn.Module, output: Any) -> Any:
        return None

    def delta_weight(self) -> torch.Tensor:
        raise not_mergeable(self.variant, self.merge_reason)

    def merge(self) -> None:
        raise not_mergeable(self.variant, self.merge_reason)

    def unmerge(self) -> None:
        """Nothing to undo: the layer is never merged."""
