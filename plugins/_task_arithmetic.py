"""Helpers shared by the task-arithmetic merge methods (``ties``, ``dare_linear``, ``dare_ties``).

A *task vector* here is one adapter's weight delta ``τ_i = ΔW_i`` of one module (any shape: a
matrix ``out x in`` or a bias vector). The helpers are the three steps the papers compose:

* :func:`trim` -- TIES' "trim": keep the ``k = round(density * numel)`` entries of largest magnitude
  (ties in magnitude broken by ``torch.topk``), zero the rest (Yadav et al. 2023, arXiv 2306.01708);
* :func:`dare` -- DARE's "drop and rescale": keep each entry with probability ``density`` (drop rate
  ``p = 1 - density``), rescale the kept ones by ``1 / density`` so ``E[dare(τ)] = τ`` (Yu et al.
  2023, arXiv 2311.03099);
* :func:`elect_and_merge` -- TIES' "elect sign" (``γ = sgn(Σ_i τ̂_i)``, the sign of the total mass)
  and "disjoint merge" (for each entry the mean of the ``τ̂_i`` whose sign agrees with ``γ``; entries
  with no agreeing value are 0).
"""

from __future__ import annotations

import torch

from adapterhub.registry import AdapterhubError, ParamError


def check_inputs(method: str, deltas: list[torch.Tensor], weights: list[float]) -> torch.dtype:
    """Validate the deltas/weights of one module; return the dtype to return the result in."""
    if not deltas:
        raise AdapterhubError(f"{method} merge needs at least one delta weight")
    if len(deltas) != len(weights):
        raise AdapterhubError(f"{method} merge got {len(deltas)} delta weights but {len(weights)} weights")
    shapes = [tuple(d.shape) for d in deltas]
    if len(set(shapes)) != 1:
        shown = ", ".join(str(list(s)) for s in shapes)
        raise AdapterhubError(f"{method} merge needs delta weights of one shape, got shapes {shown}")
    devices = {d.device for d in deltas}
    if len(devices) != 1:
        raise AdapterhubError(f"{method} merge needs delta weights on one device, got "
                              f"{', '.join(sorted(map(str, devices)))}")
    dtype = deltas[0].dtype
    for d in deltas[1:]:
        dtype = torch.promote_types(dtype, d.dtype)
    return dtype


def check_density(density: float) -> None:
    """``0 < density <= 1`` (raised as a :class:`ParamError` naming ``density``)."""
    if not 0.0 < float(density) <= 1.0:
        raise ParamError(f"density must be > 0 and <= 1 (the fraction of each delta that is kept), got {density!r}",
                         param="density")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """``delta`` with all but its ``round(density * numel)`` largest-magnitude entries set to 0."""
    n = delta.numel()
    k = int(round(float(density) * n))
    if k >= n:
        return delta.clone()
    out = torch.zeros_like(delta)
    if k <= 0:
        return out
    flat = delta.reshape(-1)
    idx = torch.topk(flat.abs(), k, sorted=False).indices
    out.view(-1)[idx] = flat[idx]
    return out


def dare(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop each entry with probability ``1 - density`` and rescale the kept ones by ``1 / density``."""
    if density >= 1.0:
        return delta.clone()
    keep = torch.rand(delta.shape, generator=generator, device=generator.device) < density
    return torch.where(keep.to(delta.device), delta / density, torch.zeros((), dtype=delta.dtype,
                                                                             device=delta.device))


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` (CPU for devices without one of their own) seeded with ``seed``."""
    dev = device if device.type in ("cpu", "cuda") else torch.device("cpu")
    return torch.Generator(device=dev).manual_seed(int(seed))


def elect_and_merge(tensors: list[torch.Tensor]) -> torch.Tensor:
    """TIES' sign election by total mass and disjoint mean of the agreeing entries."""
    stacked = torch.stack(tensors)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    count = agree.sum(0)
    total = torch.where(agree, stacked, torch.zeros((), dtype=stacked.dtype, device=stacked.device)).sum(0)
    return torch.where(count > 0, total / count.clamp(min=1).to(total.dtype),
                       torch.zeros((), dtype=total.dtype, device=total.device))
