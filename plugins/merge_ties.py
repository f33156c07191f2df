"""``ties`` merge: TIES-Merging (Yadav, Tam, Choshen, Raffel, Bansal, *TIES-Merging: Resolving
Interference When Merging Models*, NeurIPS 2023, arXiv 2306.01708), applied per module to the
adapters' weight deltas ``τ_i = ΔW_i`` (and bias deltas):

1. **trim**: ``τ̂_i`` keeps the ``round(density * numel)`` largest-magnitude entries of ``τ_i``
   (the paper's top-k%, ``density = k/100``; default 0.2 = the paper's k = 20), the rest are 0;
2. **weight**: ``τ̂_i ← w_i τ̂_i`` (the paper merges with one scale λ on the result; per-adapter
   weights as PEFT's ``ties`` generalise it -- ``w_i = 1`` is the paper's ``λ = 1``);
3. **elect sign**: ``γ = sgn(Σ_i τ̂_i)`` -- the sign with the larger total mass per entry;
4. **disjoint merge**: ``τ_m = mean{τ̂_i : sgn(τ̂_i) = γ}`` per entry (0 where none agrees).

The result is generally not low-rank: ``adapterhub compose`` re-factorises it (truncated SVD) and
reports the relative error per module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub.registry import MergeMethod, hookimpl, param

from ._task_arithmetic import accumulation_dtype, check_density, check_inputs, elect_and_merge, trim


@dataclass(frozen=True)
class TiesParams:
    density: float = param(0.2, "fraction of each delta's entries kept by magnitude (the paper's k/100)",
                           min=0.0, max=1.0)

    def __post_init__(self) -> None:
        check_density(self.density)


class TiesMerge(MergeMethod):
    name = "ties"
    Params = TiesParams
    summary = "TIES: trim each delta to its top-density magnitudes, elect the sign by total mass, disjoint mean"
    paper = ("Yadav, Tam, Choshen, Raffel, Bansal, TIES-Merging: Resolving Interference When Merging Models, "
             "NeurIPS 2023, arXiv 2306.01708")

    def merge(self, deltas: list[torch.Tensor], weights: list[float],
              params: TiesParams | None = None) -> torch.Tensor:
        params = params or TiesParams()
        dtype = check_inputs("ties", deltas, weights)
        acc = accumulation_dtype(dtype)
        trimmed = [trim(d.to(acc), params.density) * float(w) for d, w in zip(deltas, weights, strict=True)]
        return elect_and_merge(trimmed).to(dtype)


@hookimpl
def register_merge_methods(register):
    register(TiesMerge)
