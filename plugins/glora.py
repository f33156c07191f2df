"""``glora``: Generalized LoRA (Chavan et al., *One-for-All: Generalized LoRA for Parameter-Efficient
Fine-tuning*, 2023, arXiv 2306.07967).

The paper writes ``f(x) = (W0 + W0 A + B) x + C W0 + D b0 + E + b0``; what its official code
(``Arnav0400/ViT-Slim`` ``GLoRA/layer.py``) and PEFT compute -- and what this layer computes -- is
a broadcast **Hadamard** product for ``W0 A`` and a matrix-vector product for ``W0 C``:

    W' = W0 + W0 ⊙ A + B                         (out x in)
    b' = b0 + b0 ⊙ D + E + W0 C                  (out)
    y  = x W'^T + b'

Each support tensor is chosen per rule (``glora(a=lora, b=vector, c=none, d=scalar, e=none, r=4)``):

* ``a``, ``b`` -- ``lora``: ``Xd Xu`` with ``Xd``: ``out x r``, ``Xu``: ``r x in``; ``vector``: ``out x 1``
  (one factor per output row, broadcast along ``in``); ``scalar``: one value; ``none``.
* ``c`` -- ``lora``: ``Cd Cu`` with ``Cd``: ``in x r``, ``Cu``: ``r x 1``; ``vector``: ``in x 1``; ``none``.
* ``d``, ``e`` -- ``vector``: ``out``; ``scalar``: one value; ``none``.

Tensors are ``glora_<S>.Xd`` / ``glora_<S>.Xu`` (lora) or ``glora_<S>.X`` (vector, scalar), as PEFT
names them (without its adapter-name level). Trainable count = the sum of the chosen supports'
sizes: lora ``r (out + in)`` (``r (in + 1)`` for C), vector ``out`` (``in`` for C), scalar ``1``.

**Init** (paper / official code): every ``Xd``, vector, scalar, ``D`` and ``E`` is 0 and every
``Xu`` is Xavier-uniform, so the layer equals its base at the start. PEFT draws ``Xu`` with
Kaiming-uniform instead; we follow the paper.

**No base bias** (Llama): like the official code (``optimal_bias = E`` when there is no bias, plus
``W0 C`` always) we keep ``E`` and ``W0 C``: ``b' = E + W0 C``. The ``b0 ⊙ D`` term vanishes, so no
``D`` tensor is made there (it would never get a gradient; the official supernet keeps one and
counts it). PEFT instead disables C, D and E on bias-less layers.

**Defaults** ``a=lora, b=lora, c=lora, d=vector, e=vector, r=4``: every support at the largest
option of the paper's search space -- the supernet layer that ``adapterhub glora-search`` trains
and slims (rank 4 as in the paper's experiments).

**Merge** is exact structural re-parameterisation: ``delta_weight() = W0 ⊙ A + B`` (base layout)
and the bias becomes ``b'``; a base without a bias gets one on merge when E or C is active, and
loses it again on unmerge. Unmerge restores the cached ``W0`` and ``b0`` bit-exactly.

**Forward** without materialising ``W'`` where it can: vector/scalar ``A`` is ``a ⊙ (W0 x)``; ``B``
of type lora is LoRA's ``Xd (Xu x)``; lora ``A`` goes through :mod:`._glora_kernel` (a fused Triton
kernel on CUDA that never writes ``W0 ⊙ (Xd Xu)``; on CPU the exact torch form with fewer flops).
Kinds: ``linear`` (incl. quantized bases, which run dequantized) and GPT-2 ``conv1d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from adapterhub.registry import (
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    Variant,
    hookimpl,
    param,
)

from ._glora_kernel import hadamard_lowrank_matmul
from .lora import adapter_factory

SUPPORTS = ("a", "b", "c", "d", "e")
#: the options of each support, largest first (the paper's search space: 4 * 4 * 3 * 3 * 3 = 432)
CHOICES: dict[str, tuple[str, ...]] = {"a": ("lora", "vector", "scalar", "none"),
                                       "b": ("lora", "vector", "scalar", "none"),
                                       "c": ("lora", "vector", "none"),
                                       "d": ("vector", "scalar", "none"), "e": ("vector", "scalar", "none")}
AB = Literal["lora", "vector", "scalar", "none"]


@dataclass(frozen=True)
class GloraParams:
    a: AB = param("lora", "A in W0 + W0 ⊙ A + B: lora (Xd Xu), vector (out x 1), scalar or none")
    b: AB = param("lora", "B in W0 + W0 ⊙ A + B: lora (Xd Xu), vector (out x 1), scalar or none")
    c: Literal["lora", "vector", "none"] = param(
        "lora", "C in b0 + b0 ⊙ D + E + W0 C: lora (Cd in x r, Cu r x 1), vector (in x 1) or none")
    d: Literal["vector", "scalar", "none"] = param("vector", "D (bias scale b0 ⊙ D): vector (out), scalar or none")
    e: Literal["vector", "scalar", "none"] = param("vector", "E (bias shift): vector (out), scalar or none")
    r: int = param(4, "rank of the lora-type supports", positive=True)

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ParamError(f"r must be a positive int, got {self.r!r}", param="r")
        for s in SUPPORTS:
            if getattr(self, s) not in CHOICES[s]:
                raise ParamError(f"{s} must be one of {', '.join(CHOICES[s])}, got {getattr(self, s)!r}", param=s)

    def config(self) -> dict[str, str]:
        """``{support: option}`` for a..e."""
        return {s: getattr(self, s) for s in SUPPORTS}


def support_size(support: str, option: str, in_f: int, out_f: int, r: int, has_bias: bool = True) -> int:
    """Trainable parameters of one support (``D`` counts 0 on a layer without a base bias)."""
    if option == "none" or (support == "d" and not has_bias):
        return 0
    if option == "scalar":
        return 1
    if support == "c":
        return r * (in_f + 1) if option == "lora" else in_f
    return r * (out_f + in_f) if option == "lora" else out_f


def config_size(config: dict[str, str], in_f: int, out_f: int, r: int, has_bias: bool = True) -> int:
    return sum(support_size(s, config[s], in_f, out_f, r, has_bias) for s in SUPPORTS)


def info_has_bias(info: ModuleInfo) -> bool:
    """Whether a planned module has a bias (its parameters beyond the weight cover ``out``)."""
    if info.kind == "conv1d":
        return True
    weight = 0 if info.quantized else (info.in_features or 0) * (info.out_features or 0)
    return info.own_params + info.tied_params - weight >= (info.out_features or 1)


class GloraLayer(AdapterLayer):
    """GLoRA around a Linear, GPT-2 Conv1D or quantized Linear (see the module docstring).

    ``path`` (``None`` or ``{support: option}``) evaluates a *smaller* configuration from the
    tensors held -- a vector is ``Xd[:, 0]``, a scalar ``Xd[0, 0]`` (or ``X[0]``) as in the official
    supernet; ``adapterhub glora-search`` sets it per forward.
    """

    variant = "glora"
    delta_reads_base = True  # W0 ⊙ A
    exact_unmerge = True  # merge keeps W0; unmerge restores W0 and b0 bit-exactly

    def __init__(self, base_layer: nn.Module, params: GloraParams):
        super().__init__(base_layer)
        if self.kind not in Glora.kinds:
            raise ModuleTypeError(f"glora cannot wrap a {type(base_layer).__name__} (it wraps: conv1d, linear)")
        self.params = params
        self.r = params.r
        self.config = params.config()
        self.has_bias = getattr(base_layer, "bias", None) is not None
        if not self.has_bias:
            self.config["d"] = "none"  # b0 ⊙ D vanishes without b0 (module docstring)
        self.path: dict[str, str] | None = None
        base_layer.requires_grad_(False)
        f = adapter_factory(base_layer)
        self._dtype = f["dtype"]
        out_f, in_f, r = self.out_features, self.in_features, self.r
        for s in SUPPORTS:
            opt, p = self.config[s], nn.ParameterDict()
            rows = in_f if s == "c" else out_f
            if opt == "lora":
                p["Xd"] = nn.Parameter(torch.zeros(rows, r, **f))
                p["Xu"] = nn.Parameter(torch.empty(r, 1 if s == "c" else in_f, **f))
                nn.init.xavier_uniform_(p["Xu"])
            elif opt == "vector":
                p["X"] = nn.Parameter(torch.zeros((rows, 1) if s in "abc" else (rows,), **f))
            elif opt == "scalar":
                p["X"] = nn.Parameter(torch.zeros(1, **f))
            setattr(self, f"glora_{s.upper()}", p)

    # -- supports ------------------------------------------------------------------------
    def active_config(self) -> dict[str, str]:
        """The configuration the forward and merge use: ``path`` if set, else the layer's own."""
        if self.path is None:
            return self.config
        cfg = dict(self.path)
        if not self.has_bias:
            cfg["d"] = "none"
        return cfg

    def support(self, s: str, option: str) -> Any:
        """Support ``s`` as ``option`` from the held tensors: ``(Xd, Xu)`` for lora, a vector (``out``
        or ``in`` rows), a 0-d scalar, or ``None``; smaller options are slices of larger ones."""
        held = self.config[s]
        if option == "none":
            return None
        if CHOICES[s].index(option) < CHOICES[s].index(held):
            raise ParamError(f"glora: support {s} holds '{held}' tensors and cannot act as '{option}'", param=s)
        p = getattr(self, f"glora_{s.upper()}")
        if option == "lora":
            return p["Xd"], p["Xu"]
        t = p["Xd"] if held == "lora" else p["X"]
        vec = t[:, 0] if t.dim() == 2 else t
        return vec if option == "vector" else vec[0]

    def _w0(self) -> torch.Tensor:
        """``W0`` (``out x in``), also while merged (then from the state cached by :meth:`merge`)."""
        state = self._merge_state
        if not self.merged:
            return self.base_weight()
        if "quantized_base" in state:
            return state["quantized_base"].dequantize()
        return self.to_base_layout(state["weight"])

    def _b0(self) -> torch.Tensor | None:
        if self.merged and "bias" in self._merge_state:
            return self._merge_state["bias"]
        return getattr(self._merge_state.get("quantized_base", self.base_layer), "bias", None)

    def _bias_delta(self, cfg: dict[str, str], w0: torch.Tensor | None = None) -> torch.Tensor | None:
        """``b' - b0 = b0 ⊙ D + E + W0 C`` (``out``), or ``None`` when all three are off."""
        terms = []
        d, e, c = self.support("d", cfg["d"]), self.support("e", cfg["e"]), self.support("c", cfg["c"])
        if d is not None:
            terms.append(self._b0().to(d.dtype) * d)
        if e is not None:
            terms.append(e.expand(self.out_features))
        if c is not None:
            cvec = c[0] @ c[1][:, 0] if isinstance(c, tuple) else c  # in
            w = self._w0() if w0 is None else w0
            terms.append(w.to(cvec.dtype) @ cvec)
        if not terms:
            return None
        return torch.stack(terms).sum(0)

    # -- forward -------------------------------------------------------------------------
    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``x (W0 + W0 ⊙ A + B)^T + b0 + b0 ⊙ D + E + W0 C`` without building ``W'`` where possible."""
        cfg = self.active_config()
        a, bsup = self.support("a", cfg["a"]), self.support("b", cfg["b"])
        b0 = getattr(self.base_layer, "bias", None)
        w0 = None
        if isinstance(a, tuple):  # x (W0 + W0 ⊙ Xd Xu)^T: fused kernel on CUDA
            w0 = self.base_weight()
            y = hadamard_lowrank_matmul(x, w0, a[0], a[1])
            if b0 is not None:
                y = y + b0.to(y.dtype)
        else:
            y = self.base_layer(x, *args, **kwargs)
        dt = self.glora_dtype
        update = None
        if a is not None and not isinstance(a, tuple):  # a ⊙ (W0 x)
            w0x = (y - b0.to(y.dtype)) if b0 is not None else y
            update = w0x.to(dt) * a
        if bsup is not None:
            xs = x.to(dt)
            if isinstance(bsup, tuple):
                term = (xs @ bsup[1].t()) @ bsup[0].t()
            else:  # a row-constant B: (B x)_o = b_o * sum_i x_i
                term = xs.sum(-1, keepdim=True) * bsup
            update = term if update is None else update + term
        bias = self._bias_delta(cfg, w0)
        if bias is not None:
            update = bias if update is None else update + bias
        return y if update is None else y + update.to(y.dtype)

    @property
    def glora_dtype(self) -> torch.dtype:
        """The adapter tensors' dtype (fp32, or fp64 for an fp64 base)."""
        return self._dtype

    # -- merge ---------------------------------------------------------------------------
    def _full(self, s: str, cfg: dict[str, str]) -> torch.Tensor | None:
        """A or B as an ``out x in`` (broadcastable) tensor."""
        t = self.support(s, cfg[s])
        if t is None:
            return None
        if isinstance(t, tuple):
            return t[0] @ t[1]
        return t[:, None] if t.dim() == 1 else t

    def delta_weight(self) -> torch.Tensor:
        """``W0 ⊙ A + B`` (``out x in``) in the base module's layout."""
        cfg = self.active_config()
        w = self._w0().to(self.glora_dtype)
        delta = torch.zeros_like(w)
        a, b = self._full("a", cfg), self._full("b", cfg)
        if a is not None:
            delta = delta + w * a
        if b is not None:
            delta = delta + b
        return self.to_base_layout(delta)

    def delta_bias(self) -> torch.Tensor | None:
        """``b' - b0 = b0 ⊙ D + E + W0 C`` (``out``), or ``None`` when D, E and C are all off."""
        return self._bias_delta(self.active_config())

    def extra_repr(self) -> str:
        return ", ".join(f"{s}={o}" for s, o in self.config.items()) + f", r={self.r}"


class Glora(Variant):
    name = "glora"
    Params = GloraParams
    kinds = frozenset({"linear", "conv1d"})
    summary = "generalized LoRA: W0 + W0 ⊙ A + B, bias b0 + b0 ⊙ D + E + W0 C; each support lora/vector/scalar/none"
    paper = ("Chavan, Liu, Gupta, Xing, Shen, One-for-All: Generalized LoRA for Parameter-Efficient "
             "Fine-tuning, 2023, arXiv 2306.07967")
    mergeable = True

    def trainable_params(self, params: GloraParams, info: ModuleInfo) -> int:
        """Sum of the chosen supports' sizes (see :func:`support_size`)."""
        self.check_module(info)
        return config_size(params.config(), info.in_features, info.out_features, params.r, info_has_bias(info))

    def wrap(self, module: nn.Module, params: GloraParams, ctx: ApplyContext, name: str) -> GloraLayer:
        self.check_wrappable(module, name)
        return GloraLayer(module, params)


def format_call(config: dict[str, str], r: int) -> str:
    """``glora(a=..., b=..., c=..., d=..., e=..., r=...)`` -- the DSL call for a configuration."""
    return "glora(" + ", ".join(f"{s}={config[s]}" for s in SUPPORTS) + f", r={r})"


@hookimpl
def register_variants(register):
    register(Glora)

