"""``vera``: vector-based random matrix adaptation.

Kopiczko, Blankevoort, Asano, *VeRA: Vector-based Random Matrix Adaptation*, 2023 (ICLR'24),
arXiv 2310.11454. One pair of frozen random matrices is shared by every adapted layer of an
``apply``; each layer trains only two vectors:

    y = W0 x + b0 + b ⊙ (B_ℓ (d ⊙ (A_ℓ x))),    A_ℓ = A[:, :in],  B_ℓ = B[:out, :]
    A ∈ ℝ^{r×in_max}, B ∈ ℝ^{out_max×r}: frozen, shared, sliced per layer
    d ∈ ℝ^r (``vera_lambda_d``, init ``d_init`` = 0.1), b ∈ ℝ^{out} (``vera_lambda_b``, init 0)

so ΔW = 0 at the start and the merge is exact: ``W = W0 + diag(b) B_ℓ diag(d) A_ℓ`` (transposed for
GPT-2's Conv1D). Trainable parameters: ``r + out`` per layer.

The projection is drawn exactly as PEFT does (``VeraModel._init_vera_A_vera_B``): a CPU
``torch.Generator`` seeded with ``seed`` (PEFT's ``projection_prng_key``) fills ``A`` then ``B``
with kaiming_uniform (bound ``sqrt(6 / fan_in)``) in fp32; the result is moved to the layers'
device (and cast to fp64 for an fp64 base). ``in_max``/``out_max`` are the largest ``in``/``out``
over the modules this ``apply`` wraps with the same ``r``/``seed``/``save_projection`` (PEFT: the
largest over its target modules): each ``wrap`` grows the shared projection if its module is
larger, redrawing it from the seed, so after ``apply`` it is exactly the draw for the final maxima
-- bit-exact and reproducible from the spec and the model alone.

``save_projection=true`` (the default, as PEFT) stores ``vera_A``/``vera_B`` once in the bundle (on
the layer that created them) and loading uses the stored tensors; with ``false`` the projection
buffers are non-persistent, the bundle holds only ``d`` and ``b``, and loading redraws the
projection from the seed. The ``B``/``d``/``b`` part of the forward runs as one Triton kernel on
CUDA (:mod:`adapterhub.plugins._scaled_lowrank`). PEFT initialises ``b = 0`` and ``d = d_initial``
like the paper; defaults follow PEFT/the paper (r = 256, d_init = 0.1, seed 0).
"""

from __future__ import annotations

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
    param,
)

from ._scaled_lowrank import adapter_factory, add_scaled_lowrank


@dataclass(frozen=True)
class VeraParams:
    r: int = param(256, "rank of the shared random projections A (r x in_max), B (out_max x r)", positive=True)
    d_init: float = param(0.1, "initial value of every entry of the trainable vector d (b starts at 0)")
    seed: int = param(0, "seed of the torch.Generator that draws A and B (PEFT's projection_prng_key)", min=0)
    save_projection: bool = param(True, "store A and B in the bundle (else loading redraws them from seed)")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ParamError(f"r must be a positive int, got {self.r!r}", param="r")
        if self.d_init == 0:
            raise ParamError("d_init must be non-zero: with b = 0 at the start, d = 0 would leave both "
                             "vectors without gradient", param="d_init")
        if self.seed < 0:
            raise ParamError(f"seed must be >= 0, got {self.seed!r}", param="seed")


def draw_projection(r: int, in_max: int, out_max: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (``r x in_max``) then ``B`` (``out_max x r``) from one CPU generator, fp32 (PEFT's draw)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    A = torch.empty(r, in_max)
    B = torch.empty(out_max, r)
    with torch.no_grad():
        nn.init.kaiming_uniform_(A, generator=gen)
        nn.init.kaiming_uniform_(B, generator=gen)
    return A, B


class VeraProjection(nn.Module):
    """The shared frozen ``vera_A``/``vera_B`` buffers of one ``apply``; every layer holds this module.

    Being one module (not per-layer buffers) keeps it one tensor through ``model.to(...)``.
    """

    def __init__(self, r: int, seed: int, persistent: bool, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.r, self.seed, self.persistent = r, seed, persistent
        self.in_max = self.out_max = 0
        self.register_buffer("vera_A", torch.empty(r, 0, device=device, dtype=dtype), persistent=persistent)
        self.register_buffer("vera_B", torch.empty(0, r, device=device, dtype=dtype), persistent=persistent)

    def grow(self, in_features: int, out_features: int) -> None:
        """Make room for a module ``in_features -> out_features``: redraw at the new maxima."""
        if in_features <= self.in_max and out_features <= self.out_max:
            return
        self.in_max, self.out_max = max(self.in_max, in_features), max(self.out_max, out_features)
        A, B = draw_projection(self.r, self.in_max, self.out_max, self.seed)
        like = self.vera_A
        self.register_buffer("vera_A", A.to(like.device, like.dtype), persistent=self.persistent)
        self.register_buffer("vera_B", B.to(like.device, like.dtype), persistent=self.persistent)

    def extra_repr(self) -> str:
        return f"r={self.r}, in_max={self.in_max}, out_max={self.out_max}, seed={self.seed}"


class VeraLayer(AdapterLayer):
    """A VeRA adapter: trainable ``vera_lambda_d`` (r), ``vera_lambda_b`` (out) on the shared projection.

    ``vera_A``/``vera_B`` are the full shared matrices; the layer uses ``A[:, :in]``, ``B[:out]``.
    """

    variant = "vera"

    def __init__(self, base_layer: nn.Module, projection: VeraProjection, d_init: float = 0.1,
                 save_projection: bool = True, owns_projection: bool = False):
        super().__init__(base_layer)
        if self.kind not in Vera.kinds:
            raise ModuleTypeError(f"vera cannot wrap a {type(base_layer).__name__} "
                                  f"(it wraps: {', '.join(sorted(Vera.kinds))})")
        base_layer.requires_grad_(False)
        projection.grow(self.in_features, self.out_features)
        self.r = projection.r
        self.d_init = float(d_init)
        self.save_projection = bool(save_projection)
        self.owns_projection = owns_projection
        self.vera_projection = projection
        factory = {"device": projection.vera_A.device, "dtype": projection.vera_A.dtype}
        self.vera_lambda_d = nn.Parameter(torch.full((self.r,), self.d_init, **factory))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, **factory))

    @property
    def vera_A(self) -> torch.Tensor:
        return self.vera_projection.vera_A

    @property
    def vera_B(self) -> torch.Tensor:
        return self.vera_projection.vera_B

    def sliced(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:, :in]`` and ``B[:out, :]`` on this layer's device."""
        device = self.vera_lambda_d.device
        return (self.vera_A[:, : self.in_features].to(device),
                self.vera_B[: self.out_features, :].to(device))

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + b ⊙ (B_ℓ (d ⊙ (A_ℓ x)))``; the B/d/b part is the shared (fused) kernel."""
        result = self.base_layer(x, *args, **kwargs)
        A, B = self.sliced()
        x_a = F.linear(x.to(A.dtype), A)
        return add_scaled_lowrank(result, x_a, B, self.vera_lambda_d, self.vera_lambda_b, 1.0)

    def delta_weight(self) -> torch.Tensor:
        """``diag(b) B_ℓ diag(d) A_ℓ`` (``out x in``) in the base module's own layout."""
        A, B = self.sliced()
        delta = (self.vera_lambda_b[:, None] * B) @ (self.vera_lambda_d[:, None] * A)
        return self.to_base_layout(delta)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """``d``, ``b``; plus the full ``vera_A``/``vera_B`` once (owner, ``save_projection``)."""
        state = {k: t for k, t in super().adapter_state_dict().items() if not k.startswith("vera_projection.")}
        if self.save_projection and self.owns_projection:
            state["vera_A"] = self.vera_A
            state["vera_B"] = self.vera_B
        return state

    def extra_repr(self) -> str:
        return f"r={self.r}, d_init={self.d_init:g}, save_projection={self.save_projection}"


class Vera(Variant):
    name = "vera"
    Params = VeraParams
    kinds = frozenset({"linear", "conv1d"})
    summary = ("frozen random A, B shared by all layers, per-layer trainable vectors: "
               "W0 + diag(b) B diag(d) A")
    paper = ("Kopiczko, Blankevoort, Asano, VeRA: Vector-based Random Matrix Adaptation, 2023, "
             "arXiv 2310.11454")
    mergeable = True

    @staticmethod
    def share_key(params: VeraParams) -> str:
        return f"vera[r={params.r}, seed={params.seed}, save_projection={params.save_projection}]"

    def trainable_params(self, params: VeraParams, info: ModuleInfo) -> int:
        """``r`` (d) + ``out`` (b)."""
        self.check_module(info)
        return params.r + info.out_features

    def wrap(self, module: nn.Module, params: VeraParams, ctx: ApplyContext, name: str) -> VeraLayer:
        self.check_wrappable(module, name)
        created: list[bool] = []

        def factory() -> VeraProjection:
            created.append(True)
            return VeraProjection(params.r, params.seed, params.save_projection, **adapter_factory(module))

        projection = ctx.share(self.share_key(params), factory)
        return VeraLayer(module, projection, d_init=params.d_init, save_projection=params.save_projection,
                         owns_projection=bool(created))


@hookimpl
def register_variants(register):
    register(Vera)
