"""Choosing the optimizer for adapter training, QLoRA's 8-bit and paged AdamW included.

``make_optimizer(params, name, lr, **kw)``:

=====================  ==========================================  ===================================
name                   optimizer                                   state per trained weight
=====================  ==========================================  ===================================
``adamw``              ``torch.optim.AdamW``                       2 x fp32
``adamw_8bit``         ``bitsandbytes.optim.AdamW8bit``            2 x uint8 + fp32 absmax per block
``paged_adamw_8bit``   ``bitsandbytes.optim.PagedAdamW8bit``       as adamw_8bit, in CUDA unified memory
``paged_adamw_32bit``  ``bitsandbytes.optim.PagedAdamW32bit``      2 x fp32, in CUDA unified memory
=====================  ==========================================  ===================================

8-bit AdamW (Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, 2021, arXiv
2110.02861) keeps both moments as 8-bit dynamic-code values with one fp32 absmax per block of 256;
bitsandbytes keeps tensors smaller than ``min_8bit_size`` (default 4096 elements) in fp32 -- pass
``min_8bit_size=...`` to change that. Paged optimizers (QLoRA, arXiv 2305.14314) put the state in
CUDA unified memory so that it is paged to CPU RAM on memory spikes; they need a CUDA device.
bitsandbytes 0.50 runs the 8-bit optimizers on CPU; for parameters not on CUDA a paged name warns
once and uses the same optimizer unpaged (what bitsandbytes itself falls back to), so a script
written for the GPU also runs on CPU. Extra keywords go to the optimizer (``betas``,
``weight_decay``, ``eps``, ...).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from adapterhub.registry import ParamError

#: name -> (bitsandbytes class or None for torch, the unpaged bitsandbytes class used off CUDA)
OPTIMIZERS: dict[str, tuple[str | None, str | None]] = {
    "adamw": (None, None),
    "adamw_8bit": ("AdamW8bit", None),
    "paged_adamw_8bit": ("PagedAdamW8bit", "AdamW8bit"),
    "paged_adamw_32bit": ("PagedAdamW32bit", "AdamW32bit"),
}


def _bnb_optim() -> Any:
    from adapterhub.plugins._bnb import bnb_functional

    bnb_functional()  # imports bitsandbytes with its import-time notices filtered
    import bitsandbytes.optim as optim

    return optim


def _param_list(params: Any) -> list[Any]:
    if isinstance(params, torch.Tensor):
        raise TypeError("params must be an iterable of tensors or of parameter-group dicts, not a tensor")
    if isinstance(params, torch.nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    return list(params)


def _tensors(groups: list[Any]) -> Iterable[torch.Tensor]:
    for g in groups:
        if isinstance(g, dict):
            yield from g["params"]
        else:
            yield g


def make_optimizer(params: Any, name: str = "adamw", lr: float = 2e-4, **kw: Any) -> torch.optim.Optimizer:
    """An optimizer by name (see the module docstring) over ``params``.

    ``params``: tensors, parameter-group dicts, or a module (its parameters that require grad).
    ``lr`` defaults to QLoRA's 2e-4. Raises :class:`ParamError` for an unknown name (with the
    nearest names) and for no parameters at all.
    """
    if name not in OPTIMIZERS:
        close = difflib.get_close_matches(name, list(OPTIMIZERS), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ParamError(f"unknown optimizer '{name}' (known: {', '.join(OPTIMIZERS)}){hint}", param="name")
    groups = _param_list(params)
    tensors = list(_tensors(groups))
    if not tensors:
        raise ParamError("make_optimizer got no parameters: is anything trainable (did apply run)?", param="params")
    bnb_name, unpaged = OPTIMIZERS[name]
    if bnb_name is None:
        return torch.optim.AdamW(groups, lr=lr, **kw)
    optim = _bnb_optim()
    if unpaged is not None and not all(t.device.type == "cuda" for t in tensors):
        devices = sorted({t.device.type for t in tensors})
        warnings.warn(f"{name}: paged optimizers need a CUDA device (their state lives in CUDA unified memory); "
                      f"the parameters are on {', '.join(devices)}, so the optimizer state stays in ordinary "
                      f"memory ({unpaged}, no paging)", UserWarning, stacklevel=2)
        bnb_name = unpaged
    return getattr(optim, bnb_name)(groups, lr=lr, **kw)
