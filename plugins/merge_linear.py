"""``linear`` merge: the exact weighted sum of the adapters' weight deltas.

``dW = sum_i w_i dW_i`` (with ``normalize``: ``sum_i w_i dW_i / sum_i w_i``). Unlike PEFT's
``add_weighted_adapter(combination_type="linear")``, which mixes A and B separately and so adds
cross terms ``B_i A_j``, this works on the deltas themselves and has no cross terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterhub.registry import AdapterhubError, MergeMethod, hookimpl, param


@dataclass(frozen=True)
class LinearMergeParams:
    normalize: bool = param(False, "divide by the sum of the weights (a weighted mean)")


class LinearMerge(MergeMethod):
    name = "linear"
    Params = LinearMergeParams
    summary = "exact weighted sum of the adapters' delta weights: sum_i w_i dW_i"
    #: the merged delta is a linear combination of the inputs: its rank is at most Σ r_i, which
    #: ``adapterhub compose`` uses as the default output rank so the composed LoRA is exact
    sum_rank = True

    def merge(self, deltas: list[torch.Tensor], weights: list[float],
              params: LinearMergeParams | None = None) -> torch.Tensor:
        """``sum_i w_i dW_i`` accumulated in at least fp32, returned in the deltas' common dtype."""
        if not deltas:
            raise AdapterhubError("linear merge needs at least one delta weight")
        if len(deltas) != len(weights):
            raise AdapterhubError(f"linear merge got {len(deltas)} delta weights but {len(weights)} weights")
        shapes = [tuple(d.shape) for d in deltas]
        if len(set(shapes)) != 1:
            shown = ", ".join(str(list(s)) for s in shapes)
            raise AdapterhubError(f"linear merge needs delta weights of one shape, got shapes {shown}")
        devices = {d.device for d in deltas}
        if len(devices) != 1:
            shown = ", ".join(sorted(map(str, devices)))
            raise AdapterhubError(f"linear merge needs delta weights on one device, got {shown}")
        dtype = deltas[0].dtype
        for d in deltas[1:]:
            dtype = torch.promote_types(dtype, d.dtype)
        acc_dtype = torch.promote_types(dtype, torch.float32)
        total = float(sum(weights))
        if params is not None and params.normalize:
            if total == 0:
                raise AdapterhubError("linear merge with normalize=true needs weights that do not sum to 0")
            weights = [w / total for w in weights]
        out = torch.zeros(shapes[0], dtype=acc_dtype, device=deltas[0].device)
        for w, d in zip(weights, deltas, strict=True):
            out.add_(d.to(acc_dtype), alpha=float(w))
        return out.to(dtype)


@hookimpl
def register_merge_methods(register):
    register(LinearMerge)
