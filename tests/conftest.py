"""Shared fixtures: the built-in tiny models (random weights from a fixed seed).

Triton kernel tests on a GPU: by default the kernel tests run on CPU tensors through the Triton
interpreter (``TRITON_INTERPRET=1``, set below), forcing the kernel path where a layer would take
the torch path on CPU. With ``ADAPTERHUB_TEST_TRITON_GPU=1`` the interpreter stays off, the
``kernel_device`` fixture is CUDA (the tests skip with a reason when CUDA is unavailable), the
kernels run compiled on CUDA tensors and layers reach them through the automatic dispatch
(``ADAPTERHUB_KERNELS=auto``), compared with the torch path on the same device or float64::

    ADAPTERHUB_TEST_TRITON_GPU=1 python -m pytest tests/test_lora_kernel.py tests/test_nf4_kernel.py \
        tests/test_slora.py tests/test_scaled_lowrank_kernel.py tests/test_dora.py tests/test_glora.py \
        -k "kernel or triton or fused or dispatch"
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
#: kernel tests on CUDA (see the module docstring) instead of the CPU interpreter
TRITON_GPU = os.environ.get("ADAPTERHUB_TEST_TRITON_GPU") == "1"
# Triton kernels are correctness-tested on CPU through the interpreter; this must be set before
# any kernel module is imported (it decides how @triton.jit builds kernels).
if not TRITON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.pop("TRITON_INTERPRET", None)  # GPU mode: compiled kernels, never the interpreter
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add contention


@pytest.fixture
def kernel_device():
    """Where kernel tests put their tensors: CUDA under ``ADAPTERHUB_TEST_TRITON_GPU=1``, else CPU."""
    import torch

    if not TRITON_GPU:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("ADAPTERHUB_TEST_TRITON_GPU=1 but torch sees no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def kernel_env(kernel_device):
    """The ``ADAPTERHUB_KERNELS`` value that sends a layer to its kernel on ``kernel_device``:
    ``triton`` (forced; CPU tensors, interpreter) or ``auto`` (CUDA tensors, the default dispatch)."""
    return "auto" if kernel_device.type == "cuda" else "triton"


@pytest.fixture
def tiny_llama():
    from adapterhub.models import build_builtin

    return build_builtin("tiny-llama")


@pytest.fixture
def tiny_gpt2():
    from adapterhub.models import build_builtin

    return build_builtin("tiny-gpt2")


@pytest.fixture
def tiny_bert():
    from adapterhub.models import build_builtin

    return build_builtin("tiny-bert")


@pytest.fixture
def llama_dir(tmp_path, tiny_llama):
    """tiny-llama saved in Hugging Face format (config.json + model.safetensors)."""
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    return path


@pytest.fixture
def ids():
    import torch

    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
