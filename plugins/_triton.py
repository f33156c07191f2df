"""Shared helpers for the Triton kernels that live beside their variants.

One switch for every kernel, ``ADAPTERHUB_KERNELS`` (:func:`kernel_mode`): ``auto`` (default) uses a
variant's kernel when all its tensors are on CUDA and triton is importable; ``torch`` never uses kernels
(``ADAPTERHUB_DISABLE_TRITON=1`` means the same); ``triton`` uses the kernels that support it also on CPU
tensors -- only meaningful with ``TRITON_INTERPRET=1``, which is how the tests run them on CPU. The torch
path is the reference everywhere else.
"""

from __future__ import annotations

import functools
import os

import torch

from adapterhub.registry import AdapterhubError

KERNEL_MODES = ("auto", "torch", "triton")


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


def kernel_mode() -> str:
    """``ADAPTERHUB_KERNELS``: ``auto`` | ``torch`` | ``triton`` (see the module docstring)."""
    if os.environ.get("ADAPTERHUB_DISABLE_TRITON") == "1":
        return "torch"
    mode = os.environ.get("ADAPTERHUB_KERNELS", "").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise AdapterhubError(f"ADAPTERHUB_KERNELS={mode!r} is not one of: {', '.join(KERNEL_MODES)}")
    return mode


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a forward should dispatch to its Triton kernel for these tensors (``auto``: all on CUDA)."""
    if kernel_mode() == "torch" or not triton_available():
        return False
    return all(t.is_cuda for t in tensors)


def block(n: int, lo: int, hi: int) -> int:
    """The power of two >= ``n``, clamped to ``[lo, hi]`` (``tl.dot`` needs tiles of >= 16)."""
    return max(lo, min(hi, 1 << max(0, int(n) - 1).bit_length()))
