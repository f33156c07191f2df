"""``prefix``: prefix tuning (Li & Liang 2021, *Prefix-Tuning: Optimizing Continuous Prompts for
Generation*, arXiv 2101.00190).

Every transformer block ``l`` gets ``p`` trainable key/value entries in front of the keys and values its
self-attention computes from the real tokens:

    head_h = softmax( q_h [P_K^l ; K_h]^T / sqrt(d_h) + M ) [P_V^l ; V_h]

``P_K^l, P_V^l``: ``p x (kv_heads * head_dim)`` (split by head like ``K``, ``V``; grouped-query models
share them across the query heads of a group exactly as their real keys). The mask ``M`` lets every
real token see all ``p`` prefix entries and the real tokens causally; padding in ``attention_mask``
still hides padded real tokens. The base model is frozen.

Re-parameterisation (paper section 4.3, ``projection=true``, the default): the table is not trained
directly but as ``P = MLP(P')``:

    P' : p x d          (``embedding.weight``, d = the model's hidden size)
    MLP: Linear(d, h) -> tanh -> Linear(h, 2 L kv_dim)     (``transform.0``, ``transform.2``)

whose output row ``i`` holds, for layer ``l`` and ``c = 0 (K) / 1 (V)``, the ``kv_dim`` values starting
at column ``(2 l + c) kv_dim`` (PEFT's ``PrefixEncoder`` layout). ``h = projection_hidden`` (0: ``d``,
PEFT's default; the paper's code used 512). For grouped-query models PEFT narrows ``P'`` and ``h`` to
``kv_dim``; we keep ``d`` (the paper has no GQA). Where the shapes agree the outputs equal PEFT's.
With ``projection=false`` the table itself is trained, stored as ``embedding.weight`` of shape
``p x 2 L kv_dim``. Trainable count:

    projection:     p d + d h + h + h (2 L kv_dim) + 2 L kv_dim
    no projection:  p (2 L kv_dim)

Init (PEFT's ``PrefixEncoder``, as the paper's code): ``P'`` (or the table) ~ N(0, 1), the Linears
PyTorch's default; so prefix tuning changes the model's outputs from the start. The paper's variant
"init from real words' activations" is not provided.

After training the MLP is dropped and only ``P`` matters: without gradients (``torch.no_grad``,
generation) ``P`` is computed once and cached until a parameter changes; :meth:`PrefixLayer.prefix_table`
returns it. The bundle stores the re-parameterisation's tensors (``embedding``/``transform``), so
training can resume from a saved adapter -- PEFT instead saves only the MLP's output table.

Mechanics (transformers decoder models: Llama and GPT-2 families): the layer is *attached* beside the
block list (``model.layers_prefix``) and installs a forward pre-hook on the whole model. A fresh call
gets a ``DynamicCache`` holding ``P_K^l, P_V^l`` (``batch x kv_heads x p x head_dim``) as
``past_key_values`` -- a cache passed in empty (``generate``'s) is filled in place -- and
``attention_mask`` gets ``p`` ones on the left. Positions: the model counts the cache, so the real
tokens sit at positions ``p, p+1, ...`` (as in PEFT); given ``position_ids`` are shifted by ``p`` to
match; the prefix keys themselves carry no rotary position. A call that continues a cache (generation
after the first step) finds the prefix there and only extends the mask and positions.

Not mergeable: the prefix adds attention entries, not a weight change. Encoder models (BERT) are
refused. Gradient checkpointing is refused in training (transformers drops the cache under it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapterhub.plugins._virtual_tokens import (
    PREFIX_MARK,
    VirtualTokenLayer,
    batch_and_device,
    cache_length,
    extend_mask,
    float_dtype,
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
class PrefixParams:
    tokens: int = param(20, "p: prefix key/value entries per layer", positive=True)
    projection: bool = param(True, "train the prefixes through the paper's MLP re-parameterisation P = MLP(P')")
    projection_hidden: int = param(0, "hidden width h of that MLP (0: the model's hidden size)", min=0)

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ParamError(f"tokens must be a positive int, got {self.tokens!r}", param="tokens")
        if self.projection_hidden < 0:
            raise ParamError(f"projection_hidden must be >= 0, got {self.projection_hidden!r}",
                             param="projection_hidden")
        if self.projection_hidden and not self.projection:
            raise ParamError("projection_hidden only applies with projection=true", param="projection_hidden")


def prefix_count(tokens: int, layers: int, hidden: int, kv_dim: int, projection: bool, proj_hidden: int) -> int:
    """The trainable parameters of a prefix (see the module docstring)."""
    out = 2 * layers * kv_dim
    if not projection:
        return tokens * out
    h = proj_hidden or hidden
    return tokens * hidden + hidden * h + h + h * out + out


class PrefixLayer(VirtualTokenLayer):
    """Per-layer key/value prefixes for the block list it is attached beside.

    Attributes: ``tokens`` (p), ``num_layers`` (L), ``kv_heads``, ``head_dim``, ``projection``;
    tensors ``embedding.weight`` and, with ``projection``, ``transform.0.*`` / ``transform.2.*``.
    """

    variant = "prefix"
    merge_reason = "it adds p key/value entries to every layer's attention, not a weight change"

    def __init__(self, blocks: nn.Module, tokens: int, hidden: int, kv_heads: int, head_dim: int,
                 projection: bool = True, projection_hidden: int = 0):
        super().__init__(blocks, attached=True)
        if self.kind != "blocks":
            raise ModuleTypeError(f"prefix cannot wrap a {type(blocks).__name__} (it wraps: blocks)")
        self.tokens = int(tokens)
        self.num_layers = len(blocks)
        self.hidden = int(hidden)
        self.kv_heads = int(kv_heads)
        self.head_dim = int(head_dim)
        self.kv_dim = self.kv_heads * self.head_dim
        self.projection = bool(projection)
        self.projection_hidden = int(projection_hidden) or self.hidden
        held = next(iter(blocks.parameters()), None)
        device = held.device if held is not None else torch.device("cpu")
        dtype = torch.promote_types(float_dtype(blocks), torch.float32)  # fp32 (fp64 for an fp64 model)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        out = 2 * self.num_layers * self.kv_dim
        if self.projection:
            self.embedding = nn.Embedding(self.tokens, self.hidden, **factory)
            self.transform = nn.Sequential(nn.Linear(self.hidden, self.projection_hidden, **factory), nn.Tanh(),
                                           nn.Linear(self.projection_hidden, out, **factory))
        else:
            self.embedding = nn.Embedding(self.tokens, out, **factory)
        self._table: tuple[tuple[Any, ...], torch.Tensor] | None = None

    # -- the prefixes ------------------------------------------------------------------------
    def _compute_table(self) -> torch.Tensor:
        flat = self.embedding.weight
        if self.projection:
            flat = self.transform(flat)
        # row i: [K_0 | V_0 | K_1 | V_1 | ...], each kv_dim = kv_heads * head_dim wide
        return flat.view(self.tokens, self.num_layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    def prefix_table(self) -> torch.Tensor:
        """``P`` as ``L x 2 x kv_heads x p x head_dim`` (``[:, 0]`` keys, ``[:, 1]`` values).

        Without gradients the table is computed once and reused until a parameter changes.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            self._table = None
            return self._compute_table()
        key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self.parameters())
        if self._table is None or self._table[0] != key:
            with torch.no_grad():
                self._table = (key, self._compute_table().detach())
        return self._table[1]

    def prefix_cache(self, batch: int, device: torch.device, dtype: torch.dtype, cache: Any = None) -> Any:
        """A ``DynamicCache`` (or the empty ``cache`` given) holding every layer's prefix for ``batch``."""
        if cache is None:
            from transformers import DynamicCache

            cache = DynamicCache()
        table = self.prefix_table().to(device=device, dtype=dtype)
        shape = (batch, self.kv_heads, self.tokens, self.head_dim)
        for layer in range(self.num_layers):
            cache.update(table[layer, 0].unsqueeze(0).expand(shape), table[layer, 1].unsqueeze(0).expand(shape),
                         layer)
        setattr(cache, PREFIX_MARK, self.tokens)
        return cache

    # -- the hook ----------------------------------------------------------------------------
    def pre_hook(self, model: nn.Module, kw: dict[str, Any]) -> dict[str, Any]:
        """Inject the prefix cache on a fresh call; extend the mask and shift positions always."""
        if model.training and _checkpointing(model):
            raise AdapterhubError("prefix tuning needs the key/value cache, which transformers drops under "
                                  "gradient checkpointing: call model.gradient_checkpointing_disable()")
        cache = kw.get("past_key_values")
        held = cache_length(cache)
        if held == 0:
            batch, device = batch_and_device(kw, "prefix")
            if cache is None:
                from transformers import DynamicCache

                config = getattr(model, "config", None)
                cache = DynamicCache(config=config) if config is not None else DynamicCache()
            kw["past_key_values"] = self.prefix_cache(batch, device, float_dtype(self.base_layer), cache)
        elif prefix_length(cache) != self.tokens:
            raise AdapterhubError(
                f"prefix: past_key_values already holds {held} tokens but not this adapter's {self.tokens} "
                "prefix entries; pass no cache, an empty one, or the cache this adapted model returned")
        kw["attention_mask"] = extend_mask(kw.get("attention_mask"), self.tokens, "prefix")
        if kw.get("position_ids") is not None:
            kw["position_ids"] = shift_positions(kw["position_ids"], self.tokens)
        return kw

    def adapted_forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        raise AdapterhubError("a prefix layer is not called directly: it acts through hooks on the model; "
                              "use prefix_table() for the prefixes")

    def extra_repr(self) -> str:
        return (f"tokens={self.tokens}, layers={self.num_layers}, kv_heads={self.kv_heads}, "
                f"head_dim={self.head_dim}, projection={self.projection}"
                + (f", projection_hidden={self.projection_hidden}" if self.projection else ""))


def _checkpointing(model: nn.Module) -> bool:
    """Whether transformers' gradient (activation) checkpointing is on for ``model``."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def _dims(extra: Any, where: str) -> tuple[int, int, int, int]:
    try:
        return (int(extra["num_blocks"]), int(extra["hidden_size"]), int(extra["num_kv_heads"]),
                int(extra["head_dim"]))
    except (KeyError, TypeError):
        raise ModuleTypeError(f"prefix cannot wrap module '{where}': the model's attention sizes (hidden size, "
                              "key/value heads, head dim) are unknown -- it needs a transformers config") from None


class Prefix(Variant):
    name = "prefix"
    Params = PrefixParams
    kinds = frozenset({"blocks"})
    summary = "p trainable key/value prefixes in every layer's attention (MLP re-parameterised in training)"
    paper = "Li & Liang, Prefix-Tuning: Optimizing Continuous Prompts for Generation, 2021, arXiv 2101.00190"
    mergeable = False
    attach = True

    def trainable_params(self, params: PrefixParams, info: ModuleInfo) -> int:
        """``p d + d h + h + h (2 L kv_dim) + 2 L kv_dim`` (``p (2 L kv_dim)`` without projection)."""
        self.check_module(info)
        if info.extra.get("causal") is False:
            raise ModuleTypeError(f"prefix cannot wrap module '{info.name}': prefix tuning supports decoder "
                                  "(causal) language models such as Llama and GPT-2")
        layers, hidden, kv_heads, head_dim = _dims(info.extra, info.name)
        return prefix_count(params.tokens, layers, hidden, kv_heads * head_dim, params.projection,
                            params.projection_hidden)

    def wrap(self, module: nn.Module, params: PrefixParams, ctx: ApplyContext, name: str) -> PrefixLayer:
        if module_kind(module) != "blocks":
            raise ModuleTypeError(f"prefix cannot wrap module '{name}' of type {type(module).__name__} "
                                  "(it wraps: blocks, the model's list of transformer blocks)")
        model = require_decoder(ctx.model, "prefix", name)
        owner = ctx.share("prefix:blocks", lambda: name)
        if owner != name:
            raise ModuleTypeError(f"prefix cannot wrap module '{name}': '{owner}' already has this model's prefix")
        from adapterhub.models import attention_dims

        dims = attention_dims(getattr(model, "config", None))
        _, hidden, kv_heads, head_dim = _dims({"num_blocks": len(module), **dims}, name)
        layer = PrefixLayer(module, params.tokens, hidden, kv_heads, head_dim, projection=params.projection,
                            projection_hidden=params.projection_hidden)
        layer.install_hooks(model)
        return layer


@hookimpl
def register_variants(register):
    register(Prefix)
