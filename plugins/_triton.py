"""Shared helpers for the Triton kernels that live beside their variants.

A variant's forward uses its kernel only when :func:`use_triton` says so (all tensors on CUDA,
triton importable, not disabled by ``ADAPTERHUB_DISABLE_TRITON=1``); the torch path is the
reference everywhere else. Tests run the kernels on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def interpreting() -> bool:
    """True when triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a forward should dispatch to its Triton kernel for these tensors."""
    if os.environ.get("ADAPTERHUB_DISABLE_TRITON") == "1" or not triton_available():
        return False
    return all(t.is_cuda for t in tensors)
