"""Shared fixtures: the built-in tiny models (random weights from a fixed seed)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
# Triton kernels are correctness-tested on CPU through the interpreter; this must be set before
# any kernel module is imported (it decides how @triton.jit builds kernels).
if os.environ.get("ADAPTERHUB_TEST_TRITON_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only add contention


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
