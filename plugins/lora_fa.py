"""``lora_fa``: LoRA with a frozen projection-down matrix (LoRA-FA, Zhang et al. 2023).

Zhang, Zhang, Shi, Chu, Li, *LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language
Models Fine-tuning*, 2023, arXiv 2308.03303.

For a frozen base ``y = W0 x + b`` (``W0``: ``out x in``)

    y = W0 x + b + s * B (A x),   A: r x in (frozen),  B: out x r (trained),
    s = alpha / r   (alpha / sqrt(r) with ``rslora=true``)

* init: ``A`` ~ kaiming_uniform(a=sqrt(5)) (or ``init="gaussian"``: N(0, std=1/r)) and then frozen
  at that random value; ``B = 0`` -- so the adapted model equals the base at the start;
* trainable: ``lora_B.weight`` only, ``r * out`` per layer (``lora_A.weight`` is a frozen
  parameter, kept in the state dict and in bundles so a save/load round trip is exact);
* merge (exact, as LoRA): ``W = W0 + s B A``; unmerge subtracts the same term.

Why it saves memory: with ``z = A x`` (``N x r``) and ``g = dL/dy`` (``N x out``),

    dL/dB = s g^T z          (needs z, not x)
    dL/dx = s (g B) A        (needs A and B, not x)   -- plus W0's own term, which needs W0 only

so the backward keeps ``z`` (``N x r``) instead of ``x`` (``N x in``). :class:`LoraFAFunction`
is the adapter branch as one autograd Function that saves exactly ``z`` (and the weights), so the
saving does not depend on how a given torch version decides what ``linear`` saves. (torch 2.13
already skips ``x`` for a matmul with a frozen weight; a dropout on ``x`` would not -- its
``N x in`` mask stays alive -- which is why this variant has no dropout.) If someone makes ``A``
trainable again, the Function then also saves ``x`` and returns A's gradient, so it stays correct.

PEFT has no LoRA-FA layer; ``peft.optimizers.create_lorafa_optimizer`` freezes ``lora_A`` and
implements the later revision's corrected gradient for ``B`` (``g_B (A A^T)^-1 / s^2``) in the
optimizer. That is an optimizer change; this variant follows the 2023 paper (plain gradients,
any optimizer). GPT-2's ``Conv1D`` is handled as in ``lora`` (``delta_weight`` transposed); a
quantized base (``lora_fa(...) on nf4``) runs dequantized. Embeddings are not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from adapterhub.registry import (
    ApplyContext,
    ModuleInfo,
    ModuleTypeError,
    ParamError,
    Variant,
    hookimpl,
    module_kind,
    param,
)

from .lora import LoraLayer


@dataclass(frozen=True)
class LoraFAParams:
    r: int = param(8, "rank of the update B A", positive=True)
    alpha: float = param(8.0, "lora_alpha: the update is scaled by alpha/r (alpha/sqrt(r) with rslora)",
                         positive=True)
    rslora: bool = param(False, "rank-stabilised scaling alpha/sqrt(r) instead of alpha/r")
    init: Literal["kaiming", "gaussian"] = param(
        "kaiming", "the frozen random A: kaiming_uniform(a=sqrt 5) or gaussian N(0, std 1/r); B starts at 0")

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ParamError(f"r must be a positive int, got {self.r!r}", param="r")
        if self.alpha <= 0:
            raise ParamError(f"alpha must be a positive float, got {self.alpha!r}", param="alpha")


class LoraFAFunction(torch.autograd.Function):
    """``s * (x A^T) B^T`` for ``x`` of shape ``(..., in)``; saves ``x A^T`` (``..., r``), not ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
        z = x @ a.t()
        out = (z @ b.t()) * scaling
        ctx.scaling = scaling
        ctx.x_dtype = x.dtype
        # x is kept only if A itself must get a gradient (A unfrozen by hand): never for LoRA-FA.
        ctx.save_for_backward(z, a, b, x if ctx.needs_input_grad[1] else None)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z, a, b, x = ctx.saved_tensors
        dt = z.dtype  # the dtype the forward computed in (autocast may have lowered it)
        g = grad_out.to(dt) * ctx.scaling  # s * dL/dy
        gb = g @ b.to(dt)  # (..., r): s * (g B)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (gb @ a.to(dt)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (gb.reshape(-1, gb.shape[-1]).t() @ x.to(dt).reshape(-1, x.shape[-1])).to(a.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = (g.reshape(-1, g.shape[-1]).t() @ z.reshape(-1, z.shape[-1])).to(b.dtype)
        return grad_x, grad_a, grad_b, None


def lora_fa_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The adapter branch ``s * B A x`` through :class:`LoraFAFunction`."""
    return LoraFAFunction.apply(x, a, b, scaling)


class LoraFALayer(LoraLayer):
    """LoRA-FA around a Linear, Conv1D or quantized Linear: ``lora_A.weight`` frozen, ``lora_B.weight`` trains.

    Same tensor names and attributes as :class:`LoraLayer` (``r``, ``alpha``, ``scaling``, ``rslora``,
    ``init``; ``dropout`` is always 0), so the adapter exports as a plain PEFT LoRA.
    """

    variant = "lora_fa"

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8.0, rslora: bool = False,
                 init: str = "kaiming"):
        kind = module_kind(base_layer)
        if kind not in LoraFA.kinds:
            raise ModuleTypeError(f"lora_fa cannot wrap a {type(base_layer).__name__} "
                                  f"(it wraps: {', '.join(sorted(LoraFA.kinds))})")
        super().__init__(base_layer, r=r, alpha=alpha, dropout=0.0, rslora=rslora, init=init)
        self.lora_A.weight.requires_grad_(False)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Only ``B``: ``A`` stays at its random init."""
        return [self.lora_B.weight]

    def adapted_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + s * B A x``; the adapter branch saves ``A x`` only (see the module docstring)."""
        result = self.base_layer(x, *args, **kwargs)
        update = lora_fa_update(x.to(self.adapter_dtype), self.lora_A.weight, self.lora_B.weight, self.scaling)
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", A frozen"


class LoraFA(Variant):
    name = "lora_fa"
    Params = LoraFAParams
    kinds = frozenset({"linear", "conv1d"})
    summary = "LoRA with A frozen at its random init, only B trains; backward keeps A x (N x r), not x"
    paper = ("Zhang et al., LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models "
             "Fine-tuning, 2023, arXiv 2308.03303")
    mergeable = True

    def trainable_params(self, params: LoraFAParams, info: ModuleInfo) -> int:
        """``r * out`` (B only)."""
        self.check_module(info)
        return params.r * info.out_features

    def wrap(self, module: nn.Module, params: LoraFAParams, ctx: ApplyContext, name: str) -> LoraFALayer:
        self.check_wrappable(module, name)
        return LoraFALayer(module, r=params.r, alpha=params.alpha, rslora=params.rslora, init=params.init)


@hookimpl
def register_variants(register):
    register(LoraFA)
