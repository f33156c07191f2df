"""``cat`` merge: concatenate the adapters' low-rank factors -- exact, rank ``Σ_i r_i``.

For LoRA-style deltas ``ΔW_i = B_i A_i`` (``B_i``: ``out x r_i``, ``A_i``: ``r_i x in``, LoRA's scaling
folded into ``B_i``)

    B = [w_1 B_1 | w_2 B_2 | ...]   (out x Σ r_i),   A = [A_1; A_2; ...]   (Σ r_i x in),
    B A = Σ_i w_i B_i A_i = Σ_i w_i ΔW_i

so the merged delta is exactly the weighted sum (as ``linear``) and the factors need no SVD
(:meth:`CatMerge.merge_factors`, which ``adapterhub compose`` calls when it has factors for every
input). Adapters that are not plain LoRA (DoRA, IA3, GLoRA, ...) have no factors of their own;
compose factorises their ``ΔW_i`` exactly by SVD at its numerical rank (``U √S``, ``√S Vᵀ`` for the
singular values above ``σ_max · max(out, in) · eps``), so ``cat`` stays exact for every mergeable
variant, with ``r_i`` that numerical rank. PEFT's ``cat`` concatenates LoRA factors the same way
(weights on the ``A`` side, times each adapter's scaling) and refuses anything but LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub.registry import AdapterhubError, MergeMethod, hookimpl

from ._task_arithmetic import check_inputs


@dataclass(frozen=True)
class CatMergeParams:
    pass


class CatMerge(MergeMethod):
    name = "cat"
    Params = CatMergeParams
    summary = "concatenate the LoRA factors: B = [w_i B_i], A = [A_i]; exact weighted sum, rank sum_i r_i"
    #: the merged delta is a linear combination of the inputs: its rank is at most Σ r_i
    sum_rank = True

    def merge(self, deltas: list[torch.Tensor], weights: list[float],
              params: CatMergeParams | None = None) -> torch.Tensor:
        """The delta the concatenated factors multiply to: ``Σ_i w_i ΔW_i``."""
        dtype = check_inputs("cat", deltas, weights)
        acc = torch.promote_types(dtype, torch.float32)
        out = torch.zeros(deltas[0].shape, dtype=acc, device=deltas[0].device)
        for d, w in zip(deltas, weights, strict=True):
            out.add_(d.to(acc), alpha=float(w))
        return out.to(dtype)

    def merge_factors(self, factors: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float],
                      params: CatMergeParams | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` with ``B = [w_i B_i]`` (``out x Σ r_i``) and ``A = [A_i]`` (``Σ r_i x in``)."""
        if not factors or len(factors) != len(weights):
            raise AdapterhubError(f"cat merge got {len(factors)} factor pairs and {len(weights)} weights")
        outs = {b.shape[0] for b, _ in factors}
        ins = {a.shape[1] for _, a in factors}
        if len(outs) != 1 or len(ins) != 1 or any(b.shape[1] != a.shape[0] for b, a in factors):
            shown = ", ".join(f"{list(b.shape)}x{list(a.shape)}" for b, a in factors)
            raise AdapterhubError(f"cat merge needs factors B (out x r_i), A (r_i x in) of one out and in, got {shown}")
        b = torch.cat([bi * float(w) for (bi, _), w in zip(factors, weights, strict=True)], dim=1)
        a = torch.cat([ai for _, ai in factors], dim=0)
        return b, a


@hookimpl
def register_merge_methods(register):
    register(CatMerge)
