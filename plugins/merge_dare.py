"""``dare_linear`` and ``dare_ties`` merges: DARE (Yu, Yu, Yu, Huang, Li, *Language Models are
Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch*, ICML 2024,
arXiv 2311.03099), applied per module to the adapters' weight deltas ``τ_i = ΔW_i``:

* **drop and rescale**: ``τ̃_i = m_i ⊙ τ_i / density`` with ``m_i ~ Bernoulli(density)`` per entry
  (the paper's drop rate ``p = 1 - density``; the rescale keeps ``E[τ̃_i] = τ_i``);
* ``dare_linear``: ``ΔW = Σ_i w_i τ̃_i`` (the paper's DARE + task arithmetic);
* ``dare_ties``: ``τ̃_i`` replace TIES' magnitude trim, then TIES' sign election by total mass and
  disjoint mean on ``w_i τ̃_i`` (the paper's DARE + TIES-Merging; MergeKit and PEFT do the same).

Masks are drawn from a generator seeded with ``seed``, adapter after adapter, so a merge is
reproducible; ``adapterhub compose`` derives one seed per module from ``seed`` and the module's name
so that masks of equally-shaped modules differ. Default ``density = 0.5``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub.registry import MergeMethod, hookimpl, param

from ._task_arithmetic import (
    accumulation_dtype,
    check_density,
    check_inputs,
    dare,
    elect_and_merge,
    seeded_generator,
)


@dataclass(frozen=True)
class DareParams:
    density: float = param(0.5, "keep probability of each delta entry (the paper's 1 - p); kept ones are "
                                "rescaled by 1/density", min=0.0, max=1.0)
    seed: int = param(0, "seed of the Bernoulli masks")

    def __post_init__(self) -> None:
        check_density(self.density)


def _dropped(name: str, deltas: list[torch.Tensor], weights: list[float], params: DareParams
             ) -> tuple[list[torch.Tensor], torch.dtype]:
    dtype = check_inputs(name, deltas, weights)
    acc = accumulation_dtype(dtype)
    gen = seeded_generator(params.seed, deltas[0].device)
    return [dare(d.to(acc), params.density, gen) * float(w) for d, w in zip(deltas, weights, strict=True)], dtype


PAPER = ("Yu, Yu, Yu, Huang, Li, Language Models are Super Mario: Absorbing Abilities from Homologous Models "
         "as a Free Lunch, ICML 2024, arXiv 2311.03099")


class DareLinearMerge(MergeMethod):
    name = "dare_linear"
    Params = DareParams
    summary = "DARE: drop delta entries with prob 1-density, rescale by 1/density, weighted sum"
    paper = PAPER

    def merge(self, deltas: list[torch.Tensor], weights: list[float],
              params: DareParams | None = None) -> torch.Tensor:
        dropped, dtype = _dropped("dare_linear", deltas, weights, params or DareParams())
        return torch.stack(dropped).sum(0).to(dtype)


class DareTiesMerge(MergeMethod):
    name = "dare_ties"
    Params = DareParams
    summary = "DARE drop-and-rescale, then TIES sign election by total mass and disjoint mean"
    paper = PAPER + "; TIES: arXiv 2306.01708"

    def merge(self, deltas: list[torch.Tensor], weights: list[float],
              params: DareParams | None = None) -> torch.Tensor:
        dropped, dtype = _dropped("dare_ties", deltas, weights, params or DareParams())
        return elect_and_merge(dropped).to(dtype)


@hookimpl
def register_merge_methods(register):
    register(DareLinearMerge)
    register(DareTiesMerge)
