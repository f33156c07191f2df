"""Base classes for plugins: variants (adapter layers), quantizers, merge methods.

Weight layout convention: a *Linear-like* module computes ``y = x W^T + b`` with ``W`` of shape
``out x in``. GPT-2's ``Conv1D`` stores ``W^T`` (``in x out``); ``nn.Embedding`` stores
``num_embeddings x dim`` and is treated as ``in = num_embeddings``, ``out = dim``.
``AdapterLayer.delta_weight()`` is always returned in the *base module's own layout*, so
``base.weight + delta_weight()`` is the merged weight for every kind.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import ModuleTypeError, NotMergeableError

# --------------------------------------------------------------------------- module kinds

KINDS = ("linear", "conv1d", "embedding")


ATTENTION_CHILDREN = ("self_attn", "attn", "attention")


def module_kind(module: nn.Module) -> str:
    """The kind a variant can target.

    Leaves: ``linear`` (incl. quantized linears), ``conv1d`` (GPT-2), ``embedding``.
    Containers: ``attention`` (a module whose class name ends in ``Attention``), ``blocks`` (a
    ``ModuleList`` of transformer blocks, each with a ``self_attn``/``attn``/``attention`` child).
    Anything else is ``other``.
    """
    if isinstance(module, (nn.Linear, QuantizedLinear)):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None:
        return "conv1d"
    if type(module).__name__.endswith("Attention") and any(True for _ in module.children()):
        return "attention"
    if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
            any(hasattr(block, c) for c in ATTENTION_CHILDREN) for block in module):
        return "blocks"
    return "other"


LEAF_KINDS = ("linear", "conv1d", "embedding")


def module_features(module: nn.Module) -> tuple[int | None, int | None]:
    """``(in_features, out_features)`` in the convention above, or ``(None, None)``."""
    kind = module_kind(module)
    if kind == "linear":
        return module.in_features, module.out_features
    if kind == "conv1d":
        return module.weight.shape[0], module.weight.shape[1]
    if kind == "embedding":
        return module.num_embeddings, module.embedding_dim
    return None, None


@dataclass(frozen=True)
class ModuleInfo:
    """What planning needs to know of one module -- no weights required (meta tensors are fine)."""

    name: str
    type_name: str
    kind: str  # linear | conv1d | embedding | other
    in_features: int | None
    out_features: int | None
    own_params: int  # parameters held directly by this module (not its children)
    weight_bytes: int  # bytes of those parameters as stored now
    dtype: str | None  # dtype of the weight, e.g. "float32"
    is_leaf: bool
    quantized: str | None = None  # quantizer name if already quantized
    tied_params: int = 0  # parameters it holds that another module owns (tied embeddings)
    #: facts about containers: ``num_blocks`` for ``blocks``; for ``attention``/``blocks`` the
    #: model's ``hidden_size``, ``num_heads``, ``num_kv_heads``, ``head_dim`` when known
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def depth(self) -> int:
        return self.name.count(".") + 1 if self.name else 0


# --------------------------------------------------------------------------- quantized base


class QuantizedLinear(nn.Module):
    """A frozen Linear whose weight is stored quantized.

    Subclasses hold their codes/scales as buffers and implement :meth:`dequantize` (``out x in``).
    ``forward`` dequantizes to the input's dtype (or ``compute_dtype``) and runs a dense matmul.
    """

    quantizer: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    def dequantize(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else torch.float32

    def weight_bytes(self) -> int:
        """Bytes actually held by the quantized weight (codes + all scale levels), bias excluded."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x W^T + b`` with ``W`` dequantized to the compute dtype. When a gradient flows to ``x``,
        the dequantized weight is not kept for backward: it is dequantized again there (as
        bitsandbytes' ``MatMul4Bit`` does), so training memory holds only the quantized codes."""
        dtype = self.compute_dtype or x.dtype
        xc = x.to(dtype)
        if torch.is_grad_enabled() and xc.requires_grad:
            y = _DequantizedMatmul.apply(xc, self, dtype)
        else:
            y = xc @ self.dequantize().to(dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(dtype)
        return y.to(x.dtype)

    def to_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A dense ``nn.Linear`` with the dequantized weight (or ``weight`` if given)."""
        w = self.dequantize() if weight is None else weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        lin.requires_grad_(False)
        return lin

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quantizer}"


class _DequantizedMatmul(torch.autograd.Function):
    """``x W^T`` for a frozen quantized ``W``: saves nothing for backward, where ``dx = g W``
    dequantizes ``W`` again (the weight gets no gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, module: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
        ctx.module, ctx.dtype = module, dtype
        return x @ module.dequantize().to(dtype).t()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad @ ctx.module.dequantize().to(ctx.dtype), None, None


# --------------------------------------------------------------------------- adapter layers


class AdapterLayer(nn.Module):
    """An adapter wrapped around ``base_layer``; ``forward`` = base output + the variant's update.

    Subclasses implement :meth:`adapted_forward` (the paper's math in torch) and, when mergeable,
    :meth:`delta_weight`. ``merge`` folds the update into the base weight (dequantizing a quantized
    base into a dense layer), ``unmerge`` restores the base exactly as it was before ``merge``
    up to float rounding of ``W + d - d`` (a quantized base is restored bit-exactly).
    """

    variant: ClassVar[str] = ""
    #: True when delta_weight() reads the base weight (DoRA): merge caches it for unmerge.
    delta_reads_base: ClassVar[bool] = False
    #: True: merge keeps a copy of W0 and unmerge restores it bit-exactly (costs one weight copy while merged).
    exact_unmerge: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, attached: bool = False):
        super().__init__()
        kind = module_kind(base_layer)
        #: attached layers (``Variant.attach``) sit beside their target instead of wrapping it;
        #: the target is then kept out of this module's children (and out of its state dict).
        self.attached = attached
        if attached:
            self.__dict__["base_layer"] = base_layer
        else:
            self.base_layer = base_layer
        self.kind = kind
        self.in_features, self.out_features = module_features(base_layer)
        self.merged = False
        self.disabled = False
        self._merge_state: dict[str, Any] = {}

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x, *args, **kwargs)
        return self.adapted_forward(x, *args, **kwargs)

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    # -- weights -----------------------------------------------------------------------------
    @property
    def is_quantized(self) -> bool:
        return isinstance(self.base_layer, QuantizedLinear)

    def base_weight(self) -> torch.Tensor:
        """The base weight as ``out x in`` (dequantized, transposed for Conv1D/Embedding)."""
        base = self.base_layer
        if isinstance(base, QuantizedLinear):
            return base.dequantize()
        w = base.weight
        return w.t() if self.kind in ("conv1d", "embedding") else w

    def to_base_layout(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Turn an ``out x in`` matrix into the base module's own weight layout."""
        return delta_out_in.t() if self.kind in ("conv1d", "embedding") else delta_out_in

    def delta_weight(self) -> torch.Tensor:
        """``W_merged - W_base`` in the base module's layout. Raises if the variant has none."""
        raise NotMergeableError(f"{self.variant or type(self).__name__} has no weight-space form and cannot be merged")

    def delta_bias(self) -> torch.Tensor | None:
        """``b_merged - b_base`` when the variant also changes the bias (IA3 on a biased layer,
        GLoRA), else ``None``. Compose, export and streaming merge read it beside ``delta_weight``."""
        return None

    def merge(self) -> None:
        """Fold ``delta_weight()`` (and ``delta_bias()``, making a bias if the base has none) into the
        base; forward then runs the base layer only. A quantized base is dequantized into a dense
        layer (16-bit merge) and kept for :meth:`unmerge`."""
        if self.merged:
            return
        state = self._merge_state
        with torch.no_grad():
            delta, bias = self.delta_weight().detach(), self.delta_bias()
            base = self.base_layer
            if isinstance(base, QuantizedLinear):
                deq = base.dequantize()
                state["quantized_base"] = base
                base = self.base_layer = base.to_linear((deq.float() + delta.float()).to(deq.dtype))
            else:
                if self.exact_unmerge:
                    state["weight"] = base.weight.detach().clone()
                elif self.delta_reads_base:
                    state["delta"] = delta
                base.weight.copy_((base.weight.float() + delta.float()).to(base.weight.dtype))
            if bias is not None:
                if getattr(base, "bias", None) is None:
                    state["made_bias"] = True
                    base.bias = nn.Parameter(bias.detach().to(base.weight.dtype), requires_grad=False)
                else:
                    state["bias"] = base.bias.detach().clone()
                    base.bias.copy_((base.bias.float() + bias.float()).to(base.bias.dtype))
        self.merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`: a quantized base and the bias come back bit-exactly, the weight too
        with ``exact_unmerge``, else as ``W + d - d`` in float32."""
        if not self.merged:
            return
        state = self._merge_state
        with torch.no_grad():
            if "quantized_base" in state:
                self.base_layer = state.pop("quantized_base")
            else:
                base = self.base_layer
                if "weight" in state:
                    base.weight.copy_(state.pop("weight"))
                else:
                    delta = state.pop("delta", None)
                    if delta is None:
                        delta = self.delta_weight().detach()
                    base.weight.copy_((base.weight.float() - delta.float()).to(base.weight.dtype))
                if state.pop("made_bias", False):
                    base.register_parameter("bias", None)
                elif "bias" in state:
                    base.bias.copy_(state.pop("bias"))
        state.clear()
        self.merged = False

    # -- state -------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The variant's own tensors (everything but ``base_layer``), keyed relative to this layer."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The tensors this variant trains (default: every parameter outside ``base_layer``)."""
        return [p for n, p in self.named_parameters() if not n.startswith("base_layer.")]


# --------------------------------------------------------------------------- plugin classes


@dataclass
class ApplyContext:
    """Given to every ``Variant.wrap`` call of one ``apply``: the model and a scratch space for
    tensors that several layers share (Tied-LoRA's A/B, VeRA's projections)."""

    model: nn.Module | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def share(self, key: str, factory: Any) -> Any:
        """Return the shared object for ``key``, creating it with ``factory()`` the first time."""
        if key not in self.shared:
            self.shared[key] = factory()
        return self.shared[key]


class Variant:
    """An adapter variant. Subclasses set the class attributes and implement the methods.

    name      -- the DSL name (``lora``)
    Params    -- a frozen dataclass of parameters made with ``adapterhub.registry.param``
    kinds     -- module kinds it wraps (``linear``, ``conv1d``, ``embedding``)
    summary   -- one line of what it does; ``paper`` -- citation (title, arXiv id)
    mergeable -- whether ``delta_weight`` exists
    attach    -- False: ``wrap`` returns a layer that *replaces* the module (it holds it as
                 ``base_layer``). True: the layer (built with ``attached=True``) is added *beside*
                 the module, as ``<module>_<variant>`` under the same parent, and works through
                 hooks (prefix tuning on ``blocks``); module names stay unchanged.

    Container kinds (``attention``, ``blocks``) in ``kinds`` make a matched container itself the
    target instead of standing for its leaves.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type]
    kinds: ClassVar[frozenset[str]] = frozenset({"linear"})
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    mergeable: ClassVar[bool] = True
    attach: ClassVar[bool] = False
    #: True for variants whose initialisation must see the full-precision weight and quantize it
    #: themselves (LoftQ, LQ-LoRA): for ``-> v(...) on q(...)`` the engine then calls
    #: :meth:`wrap_quantized` with the *unquantized* module instead of quantize-then-wrap.
    owns_quantization: ClassVar[bool] = False

    def check_module(self, info: ModuleInfo) -> None:
        """Raise :class:`ModuleTypeError` if this variant cannot wrap the module."""
        if info.kind not in self.kinds:
            supported = ", ".join(sorted(self.kinds))
            raise ModuleTypeError(
                f"{self.name} cannot wrap module '{info.name}' of type {info.type_name} "
                f"(it wraps: {supported})")

    def check_wrappable(self, module: nn.Module, name: str) -> None:
        """Raise :class:`ModuleTypeError` if ``module`` (full name ``name``) is not of a kind it wraps."""
        if module_kind(module) not in self.kinds:
            raise ModuleTypeError(f"{self.name} cannot wrap module '{name}' of type {type(module).__name__} "
                                  f"(it wraps: {', '.join(sorted(self.kinds))})")

    def trainable_params(self, params: Any, info: ModuleInfo) -> int:
        """How many trainable parameters wrapping ``info`` adds (for ``plan``, without building),
        not counting tensors shared with other modules (see :meth:`shared_trainable_params`)."""
        raise NotImplementedError

    def shared_trainable_params(self, params: Any, info: ModuleInfo) -> dict[str, int]:
        """Trainable tensors this module shares with others of the same apply, as ``{key: numel}``.

        Use the same key as ``ApplyContext.share``; ``plan`` counts each key once (on the first
        module that uses it). Tied-LoRA's tied A and B are the example; the default is none.
        """
        return {}

    def wrap(self, module: nn.Module, params: Any, ctx: ApplyContext, name: str) -> AdapterLayer:
        """Build the adapter layer around ``module`` (the full module name is ``name``).

        For a rule with ``on QUANT``, ``module`` is already quantized (a :class:`QuantizedLinear`)
        unless the variant sets ``owns_quantization``. ``trainable_params`` sees the rule's
        quantization as ``info.quantized`` and ``info.extra["quant_params"]``.
        """
        raise NotImplementedError

    def wrap_quantized(self, module: nn.Module, params: Any, quantizer: Quantizer, quant_params: Any,
                       ctx: ApplyContext, name: str) -> AdapterLayer:
        """For ``owns_quantization`` variants: quantize ``module`` (full precision) jointly with the
        adapter's initialisation and return the adapter layer around the quantized base."""
        raise NotImplementedError


class Quantizer:
    """A base-weight quantizer: frozen Linear/Conv1D -> :class:`QuantizedLinear`."""

    name: ClassVar[str] = ""
    Params: ClassVar[type]
    kinds: ClassVar[frozenset[str]] = frozenset({"linear", "conv1d"})
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    def check_module(self, info: ModuleInfo) -> None:
        if info.kind not in self.kinds:
            raise ModuleTypeError(
                f"quantizer {self.name} cannot quantize module '{info.name}' of type {info.type_name} "
                f"(it quantizes: {', '.join(sorted(self.kinds))})")

    def bits_per_param(self, params: Any) -> float:
        """Storage of the quantized weight in bits per parameter, all scale levels included."""
        raise NotImplementedError

    def quantize(self, module: nn.Module, params: Any) -> QuantizedLinear:
        raise NotImplementedError

    def allocate(self, params: Any, modules: list[tuple[ModuleInfo, Any]]) -> dict[str, dict[str, Any]] | None:
        """Choose per-module parameters across all modules one rule quantizes (a bits budget).

        ``modules`` holds ``(info, load_weight)`` where ``load_weight()`` returns the module's weight
        as ``out x in`` (read on demand; planning a checkpoint reads it from safetensors). Return
        ``{module name: {param: value}}`` overriding the rule's parameters for those modules -- the
        plan shows them and ``apply`` uses them -- or ``None`` when parameters are not per-module.
        """
        return None


class MergeMethod:
    """Combines several adapters' delta weights for one module into one delta."""

    name: ClassVar[str] = ""
    Params: ClassVar[type]
    summary: ClassVar[str] = ""

    def merge(self, deltas: list[torch.Tensor], weights: list[float], params: Any) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class Alias:
    """``role`` (a word usable in patterns) also matches each of ``names`` (pattern fragments)."""

    role: str
    names: tuple[str, ...]
    family: str = ""
    plugin: str = ""
