"""``longlora``: LongLoRA context extension (Chen et al. 2023, *LongLoRA: Efficient Fine-tuning of
Long-Context Large Language Models*, ICLR 2024, arXiv 2309.12307).

LongLoRA = LoRA on the attention projections + trainable embeddings and norms + RoPE position
interpolation + shifted sparse attention (S²-Attn) in training. This variant provides the last three;
the LoRA part is an ordinary rule (the paper: r=8, alpha=16 on q, k, v, o)::

    attn.* -> lora(r=8, alpha=16)
    layers -> longlora(context=2048)

1. **RoPE linear position interpolation** (Chen et al. 2023, arXiv 2306.15595): with ``L`` the model's
   ``max_position_embeddings`` and factor ``s = ceil(context / L)`` (nothing changes when ``s = 1``),
   position ``m`` is rotated as position ``m / s``: ``theta_i = base^(-2i/d) / s``. The config gets
   ``rope_parameters = {rope_type: linear, factor: s, rope_theta: base}`` and every rotary embedding
   module recomputes ``inv_freq`` from it (transformers' ``linear`` rope init divides ``inv_freq`` by s).
2. **Trainable embeddings and norms** (the paper's ``trainable_params="embed,norm"``): the input
   embedding and every normalisation layer's parameters become trainable. They stay in the base model;
   the attached layer returns them from ``trainable_parameters()`` and ``adapter_state_dict()`` (keyed
   ``<parameter name in the model>``), so bundles save and load them. Count:
   ``vocab * hidden + (2 * num_blocks + 1) * hidden`` for Llama (RMSNorm weights only).
3. **S²-Attn in training** (paper section 3.2, :mod:`._s2attn`): groups of ``G = group_ratio * N``
   tokens (default a quarter), half of the heads shifted by ``G/2`` -- with the flash-attn version's
   boundaries, not the non-flash code's ``roll`` that wraps late tokens into the first group. Installed
   through transformers' attention interface as ``adapterhub_s2``: ``model.training`` -> S²-Attn,
   eval -> transformers' ``sdpa`` attention (the paper: full attention at inference).

Init: nothing new is created, so outputs change only through the RoPE interpolation (when ``s > 1``).
Merge: the variant has no weight delta; ``merge`` is a no-op (embeddings/norms are trained in place),
so ``merge_and_unload`` of a LongLoRA spec folds the LoRA part and keeps interpolation and the
``adapterhub_s2`` attention (full attention in eval). Llama-family decoders only (a transformers config
with RoPE and the attention interface); other models are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub.plugins import _s2attn
from adapterhub.registry import (
    AdapterhubError,
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    Variant,
    hookimpl,
    module_kind,
    param,
)

ATTN_NAME = "adapterhub_s2"


@dataclass(frozen=True)
class LongLoraParams:
    context: int = param(8192, "target context length; RoPE interpolation factor ceil(context / max positions)",
                         positive=True)
    group_ratio: float = param(0.25, "S²-Attn group size as a fraction of the sequence length", positive=True)
    trainable: bool = param(True, "train the input embedding and every norm layer (the paper's embed,norm)")

    def __post_init__(self) -> None:
        if self.context <= 0:
            raise ParamError(f"context must be a positive int, got {self.context!r}", param="context")
        if not 0 < self.group_ratio <= 1:
            raise ParamError(f"group_ratio must be in (0, 1], got {self.group_ratio!r}", param="group_ratio")


def s2_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: S²-Attn when ``module.training``, else ``sdpa`` attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not module.training:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    n = query.shape[-2]
    if key.shape[-2] != n:
        raise AdapterhubError(f"longlora: S²-Attn in training needs keys for exactly the {n} query tokens "
                              f"(got {key.shape[-2]}); train without a key/value cache or prefix")
    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    ratio = getattr(module, "_adapterhub_s2_ratio", 0.25)
    group = max(1, round(n * ratio))
    mask = attention_mask
    if mask is not None and mask.dim() == 4 and mask.shape[-1] != n:
        mask = mask[..., :n]
    out = _s2attn.s2_attention(query, key, value, group, mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register ``adapterhub_s2`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS.register(ATTN_NAME, s2_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)


def interpolation_factor(context: int, original: int) -> int:
    """``ceil(context / original)``, at least 1."""
    return max(1, math.ceil(context / original))


def apply_rope_interpolation(model: nn.Module, factor: int) -> int:
    """Give ``model``'s config linear RoPE scaling by ``factor`` and recompute its rotary embeddings.

    Returns the number of rotary embedding modules updated."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = model.config
    rope = dict(getattr(config, "rope_parameters", None) or {})
    if "rope_theta" not in rope:
        raise ModuleTypeError(f"longlora cannot adapt {type(model).__name__}: its config has no RoPE parameters")
    if factor > 1:
        rope.update(rope_type="linear", factor=float(factor))
        config.rope_parameters = rope
    updated = 0
    for mod in model.modules():
        if type(mod).__name__.endswith("RotaryEmbedding") and hasattr(mod, "inv_freq"):
            if factor > 1:
                inv_freq, scale = ROPE_INIT_FUNCTIONS["linear"](config, mod.inv_freq.device)
                mod.rope_type = "linear"
                mod.inv_freq = inv_freq.to(mod.inv_freq.dtype)
                mod.original_inv_freq = inv_freq.clone()
                mod.attention_scaling = scale
            updated += 1
    if not updated:
        raise ModuleTypeError(f"longlora cannot adapt {type(model).__name__}: it has no rotary position embedding")
    return updated


def _is_norm(mod: nn.Module) -> bool:
    name = type(mod).__name__
    return name.endswith(("RMSNorm", "LayerNorm")) or isinstance(mod, (nn.LayerNorm, nn.RMSNorm))


class LongLoraLayer(AdapterLayer):
    """Attached beside the block list; holds (not owns) the model's embedding and norm parameters.

    Attributes: ``factor`` (RoPE interpolation), ``group_ratio``, ``train_names`` (the parameter
    names in the model that LongLoRA trains).
    """

    variant = "longlora"

    def __init__(self, blocks: nn.Module, model: nn.Module, factor: int, group_ratio: float, trainable: bool):
        super().__init__(blocks, attached=True)
        self.factor = int(factor)
        self.group_ratio = float(group_ratio)
        held: dict[str, nn.Parameter] = {}
        if trainable:
            emb = model.get_input_embeddings()
            mods = [m for m in model.modules() if _is_norm(m)]
            if emb is not None:
                mods.insert(0, emb)
            wanted = {id(p) for m in mods for p in m.parameters()}
            held = {n: p for n, p in model.named_parameters() if id(p) in wanted}
        self.__dict__["_held"] = held  # kept out of this module's parameters and state dict
        self.train_names = list(held)

    def adapted_forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        raise AdapterhubError("a longlora layer is not called directly: it acts through the model's attention "
                              "function and rotary embedding")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self._held.values())

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        # detached views of the live tensors: bundle loading copies into them in place
        return {name: p.detach() for name, p in self._held.items()}

    def merge(self) -> None:
        """No weight delta: embeddings and norms are trained in place."""
        self.merged = True

    def unmerge(self) -> None:
        self.merged = False

    def extra_repr(self) -> str:
        return f"factor={self.factor}, group_ratio={self.group_ratio}, trainable={len(self._held)} tensors"


def _require_llama(model: nn.Module | None, name: str) -> nn.Module:
    cfg = getattr(model, "config", None)
    if model is None or cfg is None or not isinstance(getattr(cfg, "rope_parameters", None), dict) \
            or not any(type(m).__name__.endswith("RotaryEmbedding") for m in model.modules()):
        raise ModuleTypeError(f"longlora cannot wrap module '{name}' of {type(model).__name__}: it supports "
                              "Llama-family decoders (rotary positions, transformers attention interface)")
    return model


class LongLora(Variant):
    name = "longlora"
    Params = LongLoraParams
    kinds = frozenset({"blocks"})
    summary = "LongLoRA context extension: RoPE interpolation, trainable embed+norms, S²-Attn in training"
    paper = "Chen et al., LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models, 2023, arXiv 2309.12307"
    mergeable = True
    attach = True

    def trainable_params(self, params: LongLoraParams, info: ModuleInfo) -> int:
        """``vocab * hidden + (2 L + 1) * hidden`` (Llama: embedding + RMSNorm weights); the
        embedding term only when the plan knows ``vocab_size``."""
        self.check_module(info)
        if not params.trainable:
            return 0
        try:
            layers, hidden = int(info.extra["num_blocks"]), int(info.extra["hidden_size"])
        except (KeyError, TypeError):
            raise ModuleTypeError(f"longlora cannot wrap module '{info.name}': the model's hidden size is unknown "
                                  "-- it needs a transformers config") from None
        vocab = int(info.extra.get("vocab_size", 0) or 0)
        return vocab * hidden + (2 * layers + 1) * hidden

    def wrap(self, module: nn.Module, params: LongLoraParams, ctx: ApplyContext, name: str) -> LongLoraLayer:
        if module_kind(module) != "blocks":
            raise ModuleTypeError(f"longlora cannot wrap module '{name}' of type {type(module).__name__} "
                                  "(it wraps: blocks, the model's list of transformer blocks)")
        model = _require_llama(ctx.model, name)
        owner = ctx.share("longlora:blocks", lambda: name)
        if owner != name:
            raise ModuleTypeError(f"longlora cannot wrap module '{name}': '{owner}' already has LongLoRA")
        config = model.config
        factor = interpolation_factor(params.context, int(config.max_position_embeddings))
        apply_rope_interpolation(model, factor)
        register_attention()
        config._attn_implementation = ATTN_NAME
        for sub in model.modules():
            if type(sub).__name__.endswith("Attention"):
                sub._adapterhub_s2_ratio = params.group_ratio
        return LongLoraLayer(module, model, factor, params.group_ratio, params.trainable)


@hookimpl
def register_variants(register):
    register(LongLora)
