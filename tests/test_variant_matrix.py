"""The shared variant test matrix: every case in tests/variant_cases x every family it names.

For each: the forward equals an independent computation from the layer's tensors; init behaves
as the paper says; exactly the paper's tensors train and their count matches the formula; merge
then unmerge restores the weights (atol 1e-5) and merged outputs equal unmerged (atol 1e-4);
save -> load gives identical outputs; an unsupported module type is a clear error.
"""

from __future__ import annotations

import pytest
import torch

import adapterhub
from adapterhub.models import build_builtin

from .variant_cases import BUILTIN, VariantCase, all_cases

CASES = all_cases()
PARAMS = [pytest.param(case, fam, id=f"{case.id}-{fam}") for case in CASES for fam in case.specs]


def ids_for(generator, n=2, length=10):
    return torch.randint(1, 256, (n, length), generator=generator)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def adapted(case: VariantCase, fam: str, seed=0):
    return adapterhub.apply(build_builtin(BUILTIN[fam]), case.specs[fam], seed=seed)


def perturb(case: VariantCase, model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, layer in adapterhub.adapter_layers(model):
        with torch.no_grad():
            if case.perturb is not None:
                case.perturb(layer, g)
            else:
                for p in layer.trainable_parameters():
                    p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)


def layer_input(case: VariantCase, layer, g):
    if case.input is not None:
        return case.input(layer, g)
    if layer.kind == "embedding":
        return torch.randint(0, layer.in_features, (2, 5), generator=g)
    return torch.randn(2, 5, layer.in_features, generator=g)


@pytest.mark.parametrize("case, fam", PARAMS)
def test_forward_matches_independent_reference(case, fam):
    model = adapted(case, fam)
    perturb(case, model)
    model.eval()
    g = torch.Generator().manual_seed(2)
    if case.reference_model is not None:
        ids = ids_for(g)
        expected = case.reference_model(model, build_builtin(BUILTIN[fam]), ids)
        assert torch.allclose(logits(model, ids), expected, atol=case.atol)
        return
    layers = list(adapterhub.adapter_layers(model))
    assert layers, "the spec adapted nothing"
    for name, layer in layers:
        x = layer_input(case, layer, g)
        with torch.no_grad():
            got, want = layer(x), case.reference(layer, x)
        assert torch.allclose(got, want, atol=case.atol), f"{name}: max diff {(got - want).abs().max():.3e}"


@pytest.mark.parametrize("case, fam", PARAMS)
def test_init(case, fam):
    g = torch.Generator().manual_seed(3)
    ids = ids_for(g)
    base_model = build_builtin(BUILTIN[fam])
    if fam in case.base_spec:  # e.g. the quantized base an `on nf4` case adapts
        adapterhub.apply(base_model, case.base_spec[fam])
    base = logits(base_model, ids)
    out = logits(adapted(case, fam), ids)
    if case.equals_base_at_init:
        assert torch.allclose(out, base, atol=1e-6), f"max diff {(out - base).abs().max():.3e}"
    else:
        assert not torch.allclose(out, base, atol=1e-6)


@pytest.mark.parametrize("case, fam", PARAMS)
def test_exactly_the_papers_tensors_train(case, fam):
    model = adapted(case, fam)
    trainable_ids = {id(p) for p in model.parameters() if p.requires_grad}
    counted = 0
    for name, layer in adapterhub.adapter_layers(model):
        names = {n for n, p in layer.named_parameters() if p.requires_grad}
        assert names == case.trainable(layer), name
        counted += case.count(layer)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert total == (case.count_model(model) if case.count_model else counted)
    assert all(any(p is q for _, lyr in adapterhub.adapter_layers(model) for q in lyr.parameters())
               for p in model.parameters() if id(p) in trainable_ids)
    assert model.adapterhub.plan.trainable == total


@pytest.mark.parametrize("case, fam", [p for p in PARAMS if p.values[0].mergeable])
def test_merge_unmerge(case, fam):
    model = adapted(case, fam)
    perturb(case, model)
    model.eval()
    ids = ids_for(torch.Generator().manual_seed(4))
    before_w = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = logits(model, ids)
    for _, layer in adapterhub.adapter_layers(model):
        layer.merge()
    assert torch.allclose(logits(model, ids), out, atol=1e-4)
    for _, layer in adapterhub.adapter_layers(model):
        layer.unmerge()
    after_w = dict(model.named_parameters())
    for n, w in before_w.items():
        assert torch.allclose(after_w[n], w, atol=1e-5), n
    assert torch.allclose(logits(model, ids), out, atol=1e-5)


@pytest.mark.parametrize("case, fam", [p for p in PARAMS if not p.values[0].mergeable])
def test_not_mergeable_says_so(case, fam):
    model = adapted(case, fam)
    name, layer = next(iter(adapterhub.adapter_layers(model)))
    with pytest.raises(adapterhub.AdapterhubError, match="merge"):
        layer.merge()


@pytest.mark.parametrize("case, fam", PARAMS)
def test_save_load_round_trip(case, fam, tmp_path):
    model = adapted(case, fam)
    perturb(case, model)
    model.eval()
    adapterhub.save(model, tmp_path / "b")
    fresh = adapterhub.load(build_builtin(BUILTIN[fam]), tmp_path / "b")
    fresh.eval()
    ids = ids_for(torch.Generator().manual_seed(5))
    assert torch.equal(logits(fresh, ids), logits(model, ids))


UNSUPPORTED = [pytest.param(case, fam, id=f"{case.id}-{fam}") for case in CASES for fam in case.unsupported]


@pytest.mark.parametrize("case, fam", UNSUPPORTED)
def test_unsupported_module_type_is_a_clear_error(case, fam):
    with pytest.raises(adapterhub.SurgeryError) as exc:
        adapterhub.plan(BUILTIN[fam], case.unsupported[fam])
    assert f"{case.variant} cannot wrap" in str(exc.value)
