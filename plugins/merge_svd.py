"""``svd`` merge: the weighted sum of the adapters' weight deltas, truncated to rank ``r``.

    ΔW = Σ_i w_i ΔW_i = U S Vᵀ,     ΔW_r = U_r S_r V_rᵀ   (the best rank-r approximation, Eckart–Young)

``rank = 0`` (the default) takes the largest numerical rank of the inputs (``torch.linalg.matrix_rank``:
singular values above ``σ_max · max(out, in) · eps``), so merging LoRAs of ranks 8 and 4 gives rank 8;
``adapterhub compose --rank r`` sets it. A 1-D delta (a bias) is summed without truncation. The SVD
runs in float64 on the deltas' device; the result has the deltas' dtype. (PEFT's ``svd``
combination does the same on ``B A`` products; its default rank is the largest input rank too.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub.registry import AdapterhubError, MergeMethod, ParamError, hookimpl, param

from ._task_arithmetic import check_inputs


@dataclass(frozen=True)
class SvdMergeParams:
    rank: int = param(0, "rank of the result (0: the largest numerical rank of the inputs)", min=0)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ParamError(f"rank must be an int >= 0 (0: the largest input rank), got {self.rank!r}",
                             param="rank")


def truncate(delta: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of a matrix (float64 SVD), in its dtype."""
    d = delta.to(torch.float64)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, s.numel())
    return ((u[:, :r] * s[:r]) @ vh[:r]).to(delta.dtype)


class SvdMerge(MergeMethod):
    name = "svd"
    Params = SvdMergeParams
    summary = "weighted sum of the delta weights, truncated to rank r by SVD (r=0: the largest input rank)"

    def merge(self, deltas: list[torch.Tensor], weights: list[float],
              params: SvdMergeParams | None = None) -> torch.Tensor:
        params = params or SvdMergeParams()
        dtype = check_inputs("svd", deltas, weights)
        total = torch.zeros(deltas[0].shape, dtype=torch.float64, device=deltas[0].device)
        for d, w in zip(deltas, weights, strict=True):
            total.add_(d.to(torch.float64), alpha=float(w))
        if total.dim() == 1:
            return total.to(dtype)
        if total.dim() != 2:
            raise AdapterhubError(f"svd merge needs matrices (or bias vectors), got {total.dim()}-d deltas")
        rank = params.rank or max(int(torch.linalg.matrix_rank(d.to(torch.float64))) for d in deltas)
        return truncate(total, max(rank, 1)).to(dtype)


@hookimpl
def register_merge_methods(register):
    register(SvdMerge)
