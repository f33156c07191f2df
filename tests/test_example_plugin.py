"""The third-party example plugin (examples/adapterhub-example-plugin), installed by pip, used from a spec."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

import adapterhub

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "adapterhub-example-plugin"

if importlib.util.find_spec("adapterhub_example_plugin") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must pip-install examples/adapterhub-example-plugin (see README)")
    pytest.skip("pip install ./examples/adapterhub-example-plugin to run these", allow_module_level=True)


def test_entry_point_plugin_is_registered():
    reg = adapterhub.get_registry()
    assert "rowscale" in reg.variants
    assert reg.owner("variant", "rowscale") == "example"


def test_rowscale_from_a_surgery_file(tiny_llama, ids):
    spec = EXAMPLE / "example.surgery"
    before = tiny_llama(input_ids=ids).logits
    adapterhub.apply(tiny_llama, spec)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("adapterhub_example_plugin")
    with torch.no_grad():
        assert torch.equal(tiny_llama(input_ids=ids).logits, before)  # d = 0 at init
        d = next(iter(layer.trainable_parameters()))
        d.uniform_(-0.5, 0.5)
        x = torch.randn(3, 64)
        w0 = layer.base_layer.weight
        expected = (x @ w0.T) * (1 + d)  # y = W0 x (1 + d), independent of the layer's code
        if layer.base_layer.bias is not None:
            expected = expected + layer.base_layer.bias
        assert torch.allclose(layer(x), expected, atol=1e-6)
        out = layer(x)
        layer.merge()
        assert torch.allclose(layer(x), out, atol=1e-5)
