"""The plugin registry: built-ins, fake plugins, clashes, entry-point selection, every hook."""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

import click
import pytest
import torch
from click.testing import CliRunner

from adapterhub.registry import (
    BUILTIN_PLUGINS,
    AdapterhubError,
    AdapterLayer,
    MergeMethod,
    ModuleInfo,
    PluginError,
    Quantizer,
    Variant,
    get_registry,
    hookimpl,
    hookspecs,
    registry_with,
    reset_registry,
)
from adapterhub.registry.manager import make_plugin_manager

HOOKS = ["register_variants", "register_quantizers", "register_merge_methods", "register_aliases",
         "register_commands"]


def example_plugin_installed() -> bool:
    try:
        importlib.metadata.distribution("adapterhub-example-plugin")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_example = pytest.mark.skipif(not example_plugin_installed(),
                                   reason="pip install -e examples/adapterhub-example-plugin")


@pytest.fixture(autouse=True)
def fresh_registry():
    reset_registry()
    yield
    reset_registry()


@dataclass(frozen=True)
class NoParams:
    pass


class ScaleLayer(AdapterLayer):
    """``y = base(x) * 2``: a tiny real layer for the fake plugin."""

    variant = "double"

    def adapted_forward(self, x, *args, **kwargs):
        return self.base_layer(x) * 2


class Double(Variant):
    name = "double"
    Params = NoParams
    summary = "doubles the output"

    def trainable_params(self, params, info: ModuleInfo) -> int:
        return 0

    def wrap(self, module, params, ctx, name):
        return ScaleLayer(module)


class DoublePlugin:
    @hookimpl
    def register_variants(self, register):
        register(Double)


# --------------------------------------------------------------------------- built-ins


def test_builtins_register_through_hooks():
    reg = get_registry()
    assert {"lora"} <= set(reg.variants)
    assert {"nf4", "fp4", "int8"} <= set(reg.quantizers)
    assert "linear" in reg.merge_methods
    assert reg.owner("variant", "lora") == "adapterhub.plugins.lora"
    assert reg.owner("quantizer", "nf4") == "adapterhub.plugins.nf4"
    assert reg.owner("quantizer", "fp4") == "adapterhub.plugins.fp4"
    assert reg.owner("quantizer", "int8") == "adapterhub.plugins.int8"
    assert reg.owner("merge method", "linear") == "adapterhub.plugins.merge_linear"
    table = reg.alias_table()
    assert {"self_attn", "attn", "attention"} <= set(table["attn"])
    assert {"mlp", "intermediate"} <= set(table["mlp"])
    assert {"layers", "h", "layer"} <= set(table["layers"])
    assert set(BUILTIN_PLUGINS) <= set(reg.plugin_names())
    assert get_registry() is reg  # loaded once


def test_builtin_descriptions_are_filled():
    reg = get_registry()
    for kind, table in (("variant", reg.variants), ("quantizer", reg.quantizers)):
        for name, obj in table.items():
            if reg.owner(kind, name).startswith("adapterhub.plugins."):
                assert obj.summary and obj.paper, name
    assert reg.merge_methods["linear"].summary
    assert "2106.09685" in reg.variants["lora"].paper and "2312.03732" in reg.variants["lora"].paper


def test_fake_plugin_adds_a_variant():
    reg = registry_with(DoublePlugin())
    assert "double" in reg.variants
    assert reg.owner("variant", "double") == "DoublePlugin-0"
    layer = reg.variants["double"].wrap(torch.nn.Linear(3, 2), NoParams(), None, "x")
    x = torch.randn(4, 3)
    torch.testing.assert_close(layer(x), layer.base_layer(x) * 2)


def test_duplicate_name_names_both_plugins():
    class LoraAgain(Variant):
        name = "lora"
        Params = NoParams

    class Clash:
        @hookimpl
        def register_variants(self, register):
            register(LoraAgain)

    with pytest.raises(PluginError) as info:
        registry_with(Clash())
    assert "adapterhub.plugins.lora" in str(info.value) and "Clash-0" in str(info.value)


def test_registering_a_non_variant_is_refused():
    class NotAVariant:
        name = "bogus"

    class Bad:
        @hookimpl
        def register_variants(self, register):
            register(NotAVariant)

    with pytest.raises(PluginError, match="not an adapterhub.Variant"):
        registry_with(Bad())


def test_misspelled_hook_is_an_error():
    class Typo:
        @hookimpl
        def register_variant(self, register):  # missing "s"
            register(Double)

    with pytest.raises(PluginError, match="register_variant"):
        registry_with(Typo())


def test_plugin_failing_inside_a_hook_is_named():
    class Broken:
        @hookimpl
        def register_quantizers(self, register):
            raise RuntimeError("boom")

    with pytest.raises(PluginError, match=r"Broken-0.*register_quantizers.*boom"):
        registry_with(Broken())


# --------------------------------------------------------------------------- entry points


def test_empty_load_plugins_loads_no_entry_points(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_LOAD_PLUGINS", "")
    reg = get_registry()
    assert set(reg.plugin_names()) == set(BUILTIN_PLUGINS)
    assert "rowscale" not in reg.variants
    assert "lora" in reg.variants and "nf4" in reg.quantizers


@needs_example
@pytest.mark.parametrize("selector", ["adapterhub-example-plugin", "example"])
def test_load_plugins_selects_the_example_plugin(monkeypatch, selector):
    monkeypatch.setenv("ADAPTERHUB_LOAD_PLUGINS", selector)
    reg = get_registry()
    assert "rowscale" in reg.variants
    assert reg.owner("variant", "rowscale") == "example"
    assert "example" in reg.plugin_names()


@needs_example
def test_example_plugin_variant_works(monkeypatch):
    monkeypatch.delenv("ADAPTERHUB_LOAD_PLUGINS", raising=False)
    reg = get_registry()
    rowscale = reg.variants["rowscale"]
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4)
    layer = rowscale.wrap(base, rowscale.Params(), None, "attn.q")
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.rowscale_d.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    expected = (x @ base.weight.t()) * (1 + layer.rowscale_d) + base.bias
    torch.testing.assert_close(layer(x), expected)
    w0 = base.weight.detach().clone()
    layer.merge()
    torch.testing.assert_close(base.weight, w0 * (1 + layer.rowscale_d.detach()).unsqueeze(1))
    torch.testing.assert_close(layer(x), expected)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- one test per hook


def test_every_hook_has_a_test():
    specs = [name for name in dir(hookspecs) if name.startswith("register_")]
    assert sorted(specs) == sorted(HOOKS)
    for name in specs:
        assert callable(globals().get(f"test_hook_{name}")), name


def test_hook_register_variants():
    reg = registry_with(DoublePlugin(), entry_points=False)
    assert isinstance(reg.variants["double"], Double)


def test_hook_register_quantizers():
    @dataclass(frozen=True)
    class HalfParams:
        pass

    class Half(Quantizer):
        name = "half"
        Params = HalfParams

        def bits_per_param(self, params) -> float:
            return 16.0

    class P:
        @hookimpl
        def register_quantizers(self, register):
            register(Half)

    reg = registry_with(P(), entry_points=False)
    assert reg.quantizers["half"].bits_per_param(HalfParams()) == 16.0
    assert reg.owner("quantizer", "half") == "P-0"


def test_hook_register_merge_methods():
    class Mean(MergeMethod):
        name = "mean"
        Params = NoParams

        def merge(self, deltas, weights, params):
            return sum(deltas) / len(deltas)

    class P:
        @hookimpl
        def register_merge_methods(self, register):
            register(Mean)

    reg = registry_with(P(), entry_points=False)
    out = reg.merge_methods["mean"].merge([torch.ones(2), 3 * torch.ones(2)], [1, 1], NoParams())
    assert torch.equal(out, 2 * torch.ones(2))


def test_hook_register_aliases():
    class P:
        @hookimpl
        def register_aliases(self, register):
            register("attn", ["SelfAttention"], family="t5")
            register("mlp", ["DenseReluDense"], family="t5")

    reg = registry_with(P(), entry_points=False)
    assert "SelfAttention" in reg.alias_table()["attn"] and "self_attn" in reg.alias_table()["attn"]
    assert any(a.plugin == "P-0" and a.family == "t5" for a in reg.aliases)


def test_hook_register_commands():
    class P:
        @hookimpl
        def register_commands(self, cli):
            @cli.command()
            @click.argument("name")
            def hello(name):
                """Say hello."""
                click.echo(f"hello {name}")

    @click.group()
    def group():
        """A stand-in for the adapterhub CLI group."""

    pm = make_plugin_manager([P()], entry_points=False)
    pm.hook.register_commands(cli=group)
    result = CliRunner().invoke(group, ["hello", "plugins"])
    assert result.exit_code == 0, result.output
    assert result.output == "hello plugins\n"


# --------------------------------------------------------------------------- the linear merge


def test_linear_merge_is_the_exact_weighted_sum():
    linear = get_registry().merge_methods["linear"]
    torch.manual_seed(0)
    d1, d2, d3 = torch.randn(3, 5), torch.randn(3, 5), torch.randn(3, 5)
    out = linear.merge([d1, d2, d3], [0.5, -1.0, 2.0], linear.Params())
    torch.testing.assert_close(out, 0.5 * d1 - d2 + 2 * d3, rtol=1e-6, atol=1e-6)
    mean = linear.merge([d1, d2], [1.0, 3.0], linear.Params(normalize=True))
    torch.testing.assert_close(mean, 0.25 * d1 + 0.75 * d2, rtol=1e-6, atol=1e-6)
    half = linear.merge([d1.bfloat16(), d2.bfloat16()], [1.0, 1.0], linear.Params())
    assert half.dtype == torch.bfloat16


def test_linear_merge_refuses_mismatched_shapes():
    linear = get_registry().merge_methods["linear"]
    with pytest.raises(AdapterhubError, match=r"\[3, 5\].*\[5, 3\]"):
        linear.merge([torch.zeros(3, 5), torch.zeros(5, 3)], [1.0, 1.0], linear.Params())
    with pytest.raises(AdapterhubError, match="2 delta weights but 1 weights"):
        linear.merge([torch.zeros(3), torch.zeros(3)], [1.0], linear.Params())
    with pytest.raises(AdapterhubError, match="sum to 0"):
        linear.merge([torch.zeros(3), torch.zeros(3)], [1.0, -1.0], linear.Params(normalize=True))
