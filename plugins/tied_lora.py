"""``tied_lora``: LoRA with A and B tied across layers and per-layer scaling vectors.

Renduchintala, Konuk, Kuchaiev, *Tied-LoRA: Enhancing Parameter Efficiency of LoRA with Weight
Tying*, 2023 (NAACL'24), arXiv 2311.09578. For layer ℓ with frozen ``W0^ℓ`` (``out x in``):

    y = W0^ℓ x + b0 + s · v^ℓ ⊙ (B (u^ℓ ⊙ (A x))),      s = alpha / r
    A ∈ ℝ^{r×in}, B ∈ ℝ^{out×r}: ONE pair per tie group, shared by every layer of the group
    u^ℓ ∈ ℝ^r, v^ℓ ∈ ℝ^{out}: per layer

A tie group is every module of one ``apply`` with the same ``(in, out)`` shape and the same
parameters (e.g. Llama's q/o projections share one pair, k/v another). The tied tensors are the
very same ``nn.Parameter`` in every layer of the group, so ``model.parameters()`` lists them once,
an optimizer sees one tensor, and its gradient is the sum over the group's layers. In the bundle
they are stored once, under the layer whose wrap created them.

``config`` names the trainable factors with the paper's letters ``v B u A`` (in any order and case;
``TL6`` = ``vBuA``, all four trainable, the paper's recommended configuration and the default).
Factors left out stay frozen at their initial value. The paper's other named configurations
(TL1-TL5) are not offered by name: their letter assignments could not be verified here, so spell
the letters instead (``config="vB"``, ``"vu"``, ``"BA"``, ...).

Initialisation (ΔW = 0 at the start): ``A`` and ``B`` ~ kaiming_uniform(a=√5) (as LoRA's A),
``u = v = 1``; then exactly one *trainable* factor is set to 0, the first of ``B, v, u, A`` that
``config`` trains -- so ``B = 0`` whenever B trains (LoRA's init), and a frozen random ``B`` makes
``v = 0`` instead (the paper's rule). The zero factor gets a gradient at the first step (all other
factors are non-zero), so training starts as LoRA's does.

Merge is exact per layer: ``W^ℓ = W0^ℓ + s · diag(v^ℓ) B diag(u^ℓ) A`` (transposed for GPT-2's
Conv1D). Trainable parameters: ``r·in`` (A) + ``out·r`` (B) once per tie group, ``r`` (u) +
``out`` (v) per layer -- each only if ``config`` trains it. With a fused QKV of width 3d and
config vBuA this is the paper's ``4dr + L(r + 3d)``.

The ``B``/``u``/``v`` part of the forward runs as one Triton kernel on CUDA
(:mod:`adapterhub.plugins._scaled_lowrank`). There is no PEFT equivalent; tensor names are
``tied_lora_A``, ``tied_lora_B`` (tied), ``tied_lora_u``, ``tied_lora_v`` (per layer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from adapterhub.registry import (
    AdapterLayer,
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    Variant,
    hookimpl,
    module_features,
    param,
)

from ._scaled_lowrank import adapter_factory, add_scaled_lowrank

LETTERS = "vBuA"
ZERO_ORDER = "BvuA"  # which trainable factor starts at 0: the first of these that config trains
NAMED = {"tl6": "vBuA"}


def normalise_config(value: str) -> str:
    """``config`` in the canonical order ``vBuA`` (``"ABu"`` -> ``"BuA"``, ``"TL6"`` -> ``"vBuA"``)."""
    if value.strip().lower() in NAMED:
        return NAMED[value.strip().lower()]
    if value.strip().lower().startswith("tl"):
        raise ParamError(f"config {value!r}: only TL6 (= vBuA) is known by name; spell the trainable "
                         f"factors with the letters v, B, u, A instead (e.g. config=\"vB\")", param="config")
    canon = {c.lower(): c for c in LETTERS}
    letters = [canon.get(c.lower()) for c in value]
    if not value or None in letters:
        raise ParamError(f"config must be the trainable factors, letters from v, B, u, A (e.g. \"vBuA\", "
                         f"\"vB\", \"vu\"), got {value!r}", param="config")
    if len(set(letters)) != len(letters):
        raise ParamError(f"config {value!r} names a factor twice", param="config")
    return "".join(c for c in LETTERS if c in letters)


def zero_factor(config: str) -> str:
    """The trainable factor initialised to 0 so that ΔW = 0 at the start."""
    return next(c for c in ZERO_ORDER if c in config)


@dataclass(frozen=True)
class TiedLoraParams:
    r: int = param(8, "rank of the tied A (r x in) and B (out x r)", positive=True)
    alpha: float = param(8.0, "the update is scaled by alpha/r", positive=True)
    config: str = param("vBuA", "the trainable factors in the paper's letters v, B, u, A (TL6 = vBuA); "
                                "the others stay frozen at their init")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ParamError(f"r must be a positive int, got {self.r!r}", param="r")
        if self.alpha <= 0:
            raise ParamError(f"alpha must be a positive float, got {self.alpha!r}", param="alpha")
        object.__setattr__(self, "config", normalise_config(self.config))


def make_tied(r: int, in_features: int, out_features: int, config: str,
              factory: dict[str, Any]) -> tuple[nn.Parameter, nn.Parameter]:
    """A new tied pair ``(A, B)``, initialised as the module docstring says."""
    A = torch.empty(r, in_features, **factory)
    B = torch.empty(out_features, r, **factory)
    zero = zero_factor(config)
    with torch.no_grad():
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        nn.init.kaiming_uniform_(B, a=math.sqrt(5))
        if zero == "A":
            A.zero_()
        if zero == "B":
            B.zero_()
    return nn.Parameter(A), nn.Parameter(B)


class TiedLoraLayer(AdapterLayer):
    """One layer of a tie group: the group's ``tied_lora_A``/``tied_lora_B`` plus its own ``u``, ``v``.

    ``owns_tied`` marks the layer that created the tied pair; only it carries the pair in
    :meth:`adapter_state_dict`, so a bundle stores each tied tensor once.
    """

    variant = "tied_lora"

    def __init__(self, base_layer: nn.Module, A: nn.Parameter, B: nn.Parameter, r: int = 8,
                 alpha: float = 8.0, config: str = "vBuA", owns_tied: bool = False):
        super().__init__(base_layer)
        if self.kind not in TiedLora.kinds:
            raise ModuleTypeError(f"tied_lora cannot wrap a {type(base_layer).__name__} "
                                  f"(it wraps: {', '.join(sorted(TiedLora.kinds))})")
        if tuple(A.shape) != (r, self.in_features) or tuple(B.shape) != (self.out_features, r):
            raise ValueError(f"tied_lora: tied A {tuple(A.shape)} / B {tuple(B.shape)} do not fit a layer "
                             f"{self.in_features} -> {self.out_features} at rank {r}")
        self.r = int(r)
        self.alpha = float(alpha)
        self.config = normalise_config(config)
        self.scaling = self.alpha / self.r
        self.owns_tied = owns_tied
        base_layer.requires_grad_(False)
        factory = {"device": A.device, "dtype": A.dtype}
        zero = zero_factor(self.config)
        self.tied_lora_A = A
        self.tied_lora_B = B
        self.tied_lora_u = nn.Parameter(torch.full((self.r,), 0.0 if zero == "u" else 1.0, **factory))
        self.tied_lora_v = nn.Parameter(torch.full((self.out_features,), 0.0 if zero == "v" else 1.0, **factory))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The factors ``config`` names (the tied ones are shared with the rest of the group)."""
        return [getattr(self, f"tied_lora_{c}") for c in self.config]

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + s * v ⊙ (B (u ⊙ (A x)))``; the B/u/v part is the shared (fused) kernel."""
        result = self.base_layer(x, *args, **kwargs)
        x_a = F.linear(x.to(self.tied_lora_A.dtype), self.tied_lora_A)
        return add_scaled_lowrank(result, x_a, self.tied_lora_B, self.tied_lora_u, self.tied_lora_v,
                                  self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """``s * diag(v) B diag(u) A`` (``out x in``) in the base module's own layout."""
        left = self.tied_lora_v[:, None] * self.tied_lora_B
        right = self.tied_lora_u[:, None] * self.tied_lora_A
        return self.to_base_layout((left @ right) * self.scaling)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``u``, ``v`` always; the tied ``A``, ``B`` only on the layer that owns them."""
        state = super().adapter_state_dict()
        if not self.owns_tied:
            state = {k: t for k, t in state.items() if k not in ("tied_lora_A", "tied_lora_B")}
        return state

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, config={self.config}"


class TiedLora(Variant):
    name = "tied_lora"
    Params = TiedLoraParams
    kinds = frozenset({"linear", "conv1d"})
    summary = ("LoRA with A, B tied across same-shaped layers and per-layer vectors: "
               "W0 + (alpha/r) diag(v) B diag(u) A; config picks which of v, B, u, A train")
    paper = ("Renduchintala, Konuk, Kuchaiev, Tied-LoRA: Enhancing Parameter Efficiency of LoRA with "
             "Weight Tying, 2023, arXiv 2311.09578")
    mergeable = True

    @staticmethod
    def tie_key(params: TiedLoraParams, in_features: int, out_features: int) -> str:
        """One tie group per shape and parameter set (the key of ``ApplyContext.share`` and plan)."""
        return (f"tied_lora[{in_features}x{out_features}, r={params.r}, alpha={params.alpha:g}, "
                f"config={params.config}]")

    def trainable_params(self, params: TiedLoraParams, info: ModuleInfo) -> int:
        """The per-layer part: ``r`` (u) + ``out`` (v), each only if ``config`` trains it."""
        self.check_module(info)
        return params.r * ("u" in params.config) + info.out_features * ("v" in params.config)

    def shared_trainable_params(self, params: TiedLoraParams, info: ModuleInfo) -> dict[str, int]:
        """The tied part, counted once per tie group: ``r·in`` (A) + ``out·r`` (B) if trained."""
        self.check_module(info)
        n = (params.r * info.in_features * ("A" in params.config)
             + info.out_features * params.r * ("B" in params.config))
        return {self.tie_key(params, info.in_features, info.out_features): n} if n else {}

    def wrap(self, module: nn.Module, params: TiedLoraParams, ctx: ApplyContext, name: str) -> TiedLoraLayer:
        self.check_wrappable(module, name)
        in_f, out_f = module_features(module)
        created: list[bool] = []

        def factory() -> tuple[nn.Parameter, nn.Parameter]:
            created.append(True)
            return make_tied(params.r, in_f, out_f, params.config, adapter_factory(module))

        A, B = ctx.share(self.tie_key(params, in_f, out_f), factory)
        return TiedLoraLayer(module, A, B, r=params.r, alpha=params.alpha, config=params.config,
                             owns_tied=bool(created))


@hookimpl
def register_variants(register):
    register(TiedLora)
