"""``prompt``: prompt tuning (Lester et al. 2021, *The Power of Scale for Parameter-Efficient Prompt
Tuning*, arXiv 2104.08691).

A soft prompt ``P``: ``p x d_emb`` (``prompt_embeddings``) is prepended to the embedded input of a frozen
model:

    X_e = [P ; E[x_1] ; ... ; E[x_n]]      (p + n) x d_emb

and the model runs on ``X_e``. Only ``P`` trains: ``p * d_emb`` parameters.

Init (``init``): ``"random"`` -- uniform on [-0.5, 0.5] (the paper; PEFT's ``RANDOM`` uses N(0, 1));
``"vocab"`` -- embeddings of ``p`` tokens drawn uniformly from the vocabulary (PEFT's ``SAMPLE_VOCAB``;
the paper samples among the 5,000 most common tokens, a frequency table we do not have); ``"text"`` --
embeddings of ``text``'s tokens, repeated / truncated to ``p`` (PEFT's ``TEXT``; the paper's class-label
init is this with the labels as text). ``text`` is tokenised with the model's tokenizer (the built-in
models use bytes: ``list(text.encode())``; other models a ``tokenizer`` attribute on the model or
``AutoTokenizer`` from the model's local path/cache), without special tokens. ``seed`` fixes the
random draws (default: the apply seed). The outputs differ from the base model's from the start.

Mechanics (transformers decoder models: Llama and GPT-2 families): the token embedding is wrapped;
its forward returns ``cat(P, E[ids])`` (the sequence grows by ``p``). A forward pre-hook on the whole
model builds ``inputs_embeds`` through it (``input_ids`` are replaced: GPT-2 sizes its output by the
ids), puts ``p`` ones on the left of ``attention_mask`` and ``p`` x -100 on the left of ``labels``; a
forward hook drops the ``p`` virtual positions from the returned ``logits`` (``last_hidden_state`` for
a bare model), so they line up with the caller's tokens. PEFT keeps them in a causal LM's logits; we
strip them (the loss is computed before, so it is the same as PEFT's: the last prompt position
predicts the first real token when its label is set). ``inputs_embeds`` given by the caller are taken
as the embeddings of their tokens and get ``P`` prepended the same way -- build them with
``layer.base_layer`` (the wrapped layer already prepends). Positions: the virtual tokens take
positions ``0..p-1``, the real ones ``p, p+1, ...`` (given ``position_ids`` are shifted to match;
GPT-2's learned position embeddings included). ``generate()`` works: its first step gets the prompt,
later steps continue the cache, which already holds it. Hidden states / attentions in the outputs
keep the virtual positions. ``token_type_ids`` are refused.

Not mergeable: the prompt adds input positions, not a weight change. Encoder models are refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from adapterhub.plugins._virtual_tokens import (
    VirtualTokenLayer,
    extend_mask,
    is_fresh,
    prefix_length,
    require_decoder,
    shift_positions,
)
from adapterhub.registry import (
    AdapterhubError,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    Variant,
    hookimpl,
    module_kind,
    param,
)


@dataclass(frozen=True)
class PromptParams:
    tokens: int = param(20, "p: soft-prompt embeddings prepended to the input", positive=True)
    init: Literal["random", "vocab", "text"] = param(
        "random", "how P starts: uniform(-0.5, 0.5), embeddings of sampled vocabulary tokens, or of `text`")
    text: str = param("", "init='text': the text whose token embeddings start P (repeated/truncated to p)")
    seed: int | None = param(None, "seed of the random/vocab init (default: the apply seed)")

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ParamError(f"tokens must be a positive int, got {self.tokens!r}", param="tokens")
        if self.init == "text" and not self.text:
            raise ParamError("init='text' needs a non-empty text='...'", param="text")
        if self.text and self.init != "text":
            raise ParamError(f"text only applies with init='text' (init is '{self.init}')", param="text")


def text_token_ids(model: nn.Module | None, text: str) -> list[int]:
    """``text``'s token ids with the model's tokenizer (bytes for the built-in models)."""
    from adapterhub.models import BUILTIN_MODELS

    name = str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if name in BUILTIN_MODELS:
        return list(text.encode("utf-8"))
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ParamError(f"prompt(init='text') needs the model's tokenizer, and none was found for "
                             f"'{name or type(model).__name__}' ({reason[:160]}); set model.tokenizer",
                             param="text") from None
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PromptLayer(VirtualTokenLayer):
    """A token embedding whose output starts with the soft prompt ``prompt_embeddings`` (``p x d``)."""

    variant = "prompt"
    merge_reason = "it prepends p embeddings to the input, not a weight change"

    def __init__(self, base_layer: nn.Embedding, tokens: int, init: str = "random",
                 text_ids: list[int] | None = None, seed: int | None = None):
        super().__init__(base_layer)
        if self.kind != "embedding":
            raise ModuleTypeError(f"prompt cannot wrap a {type(base_layer).__name__} (it wraps: embedding)")
        self.tokens = int(tokens)
        self.init = init
        weight = base_layer.weight
        dtype = torch.promote_types(weight.dtype, torch.float32) if weight.is_floating_point() else torch.float32
        self.prompt_embeddings = nn.Parameter(torch.empty(self.tokens, self.out_features, dtype=dtype,
                                                          device=weight.device))
        self._strip: int | None = None
        self._had_labels = False
        self.reset_prompt(text_ids, seed)

    def reset_prompt(self, text_ids: list[int] | None = None, seed: int | None = None) -> None:
        """Initialise ``P`` as ``init`` says (see the module docstring)."""
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        p, vocab = self.tokens, self.in_features
        with torch.no_grad():
            if self.init == "random":
                values = torch.rand(p, self.out_features, generator=g, dtype=torch.float64) - 0.5
                self.prompt_embeddings.copy_(values)
                return
            if self.init == "vocab":
                ids = torch.randint(0, vocab, (p,), generator=g).tolist()
            else:
                if not text_ids:
                    raise ParamError("prompt(init='text'): the text has no tokens", param="text")
                ids = (list(text_ids) * math.ceil(p / len(text_ids)))[:p]
                bad = [i for i in ids if not 0 <= i < vocab]
                if bad:
                    raise ParamError(f"prompt(init='text'): token id {bad[0]} is outside the vocabulary "
                                     f"({vocab})", param="text")
            index = torch.tensor(ids, dtype=torch.long, device=self.base_layer.weight.device)
            self.prompt_embeddings.copy_(self.base_layer.weight[index])

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped embedding's weight (transformers reads it through ``get_input_embeddings()``)."""
        return self.base_layer.weight

    def _prompt(self, like: torch.Tensor) -> torch.Tensor:
        return self.prompt_embeddings.to(device=like.device, dtype=like.dtype)

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """``cat(P, embeds)`` along the sequence (``P`` expanded over the batch)."""
        prompt = self._prompt(embeds)
        if embeds.ndim == 2:
            return torch.cat([prompt, embeds], dim=0)
        return torch.cat([prompt.expand(*embeds.shape[:-2], *prompt.shape), embeds], dim=-2)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``cat(P, E[x])``: the sequence grows by ``p``."""
        return self.prepend(self.base_layer(x, *args, **kwargs))

    # -- the hooks ---------------------------------------------------------------------------
    def pre_hook(self, model: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        """Replace ids by embeddings (with ``P`` on a fresh call); extend mask, positions, labels."""
        self._strip = None
        if kw.get("token_type_ids") is not None:
            raise AdapterhubError("prompt tuning does not support token_type_ids")
        n = self.tokens
        cache = kw.get("past_key_values")
        ids = kw.pop("input_ids", None)
        embeds = kw.get("inputs_embeds")
        fresh = is_fresh(cache)
        if ids is not None:
            embeds = self(ids) if fresh else self.base_layer(ids)
        elif embeds is not None and fresh:
            embeds = self.prepend(embeds)
        elif embeds is None:
            raise AdapterhubError("prompt: the model was called without input_ids or inputs_embeds")
        kw["input_ids"] = None
        kw["inputs_embeds"] = embeds
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), n, "prompt")
        pos = kw.get("position_ids")
        if fresh:
            if pos is not None:
                if pos.ndim != 2:
                    raise AdapterhubError(f"prompt: position_ids must be 2-D, got shape {tuple(pos.shape)}")
                first = torch.arange(n, device=pos.device, dtype=pos.dtype) + prefix_length(cache)
                kw["position_ids"] = torch.cat([first.expand(pos.shape[0], n), pos + n], dim=1)
            labels = kw.get("labels")
            if labels is not None:
                kw["labels"] = torch.cat([labels.new_full((*labels.shape[:-1], n), -100), labels], dim=-1)
            self._strip = embeds.shape[-2] - n
            self._had_labels = labels is not None
        elif pos is not None:
            kw["position_ids"] = shift_positions(pos, n)
        return kw

    def post_hook(self, model: nn.Module, output: Any) -> Any:
        """Drop the virtual positions from ``logits`` (or ``last_hidden_state``)."""
        keep, self._strip = self._strip, None
        if keep is None or output is None:
            return None
        if isinstance(output, Mapping):
            key = "logits" if output.get("logits") is not None else "last_hidden_state"
            if output.get(key) is not None:
                output[key] = _last(output[key], keep)
            return output
        if isinstance(output, tuple) and output:
            i = 1 if self._had_labels and len(output) > 1 else 0
            return (*output[:i], _last(output[i], keep), *output[i + 1:])
        return None

    def extra_repr(self) -> str:
        return f"tokens={self.tokens}, dim={self.out_features}, init={self.init}"


def _last(t: Any, keep: int) -> Any:
    """The last ``keep`` positions of a ``batch x length x ...`` tensor (all if it has fewer)."""
    if not isinstance(t, torch.Tensor) or t.ndim < 3:
        return t
    return t[:, max(t.shape[1] - keep, 0):]


class Prompt(Variant):
    name = "prompt"
    Params = PromptParams
    kinds = frozenset({"embedding"})
    summary = "a trainable soft prompt of p embeddings prepended to the input"
    paper = "Lester et al., The Power of Scale for Parameter-Efficient Prompt Tuning, 2021, arXiv 2104.08691"
    mergeable = False

    def trainable_params(self, params: PromptParams, info: ModuleInfo) -> int:
        """``p * d_emb``."""
        self.check_module(info)
        if info.extra.get("causal") is False:
            raise ModuleTypeError(f"prompt cannot wrap module '{info.name}': prompt tuning supports decoder "
                                  "(causal) language models such as Llama and GPT-2")
        return params.tokens * info.out_features

    def wrap(self, module: nn.Module, params: PromptParams, ctx: ApplyContext, name: str) -> PromptLayer:
        if module_kind(module) != "embedding":
            raise ModuleTypeError(f"prompt cannot wrap module '{name}' of type {type(module).__name__} "
                                  "(it wraps: embedding, the model's token embedding)")
        model = require_decoder(ctx.model, "prompt", name)
        get = getattr(model, "get_input_embeddings", None)
        if get is not None and get() is not module:
            raise ModuleTypeError(f"prompt cannot wrap module '{name}': the soft prompt goes before the "
                                  "model's token embedding (pattern 'embed'), not this embedding")
        owner = ctx.share("prompt:embedding", lambda: name)
        if owner != name:
            raise ModuleTypeError(f"prompt cannot wrap module '{name}': '{owner}' already has this model's prompt")
        text_ids = text_token_ids(model, params.text) if params.init == "text" else None
        layer = PromptLayer(module, params.tokens, params.init, text_ids, params.seed)
        layer.install_hooks(model)
        return layer


@hookimpl
def register_variants(register):
    register(Prompt)
