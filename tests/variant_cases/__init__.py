"""One case per variant for the shared test matrix (tests/test_variant_matrix.py).

Each module ``case_<variant>.py`` here defines ``CASES: list[VariantCase]``. A reference forward
is written from the paper's formula using the layer's own tensors -- never by calling the
layer's code.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

FAMILIES = ("llama", "gpt2", "bert")
BUILTIN = {"llama": "tiny-llama", "gpt2": "tiny-gpt2", "bert": "tiny-bert"}


@dataclass
class VariantCase:
    """How to test one variant configuration.

    variant    -- the DSL name
    specs      -- family -> spec text (families absent here are not tested for this case)
    reference  -- ``reference(layer, x) -> y``: the layer's output from the paper's formula,
                  computed from ``layer``'s tensors (``layer.base_layer`` gives W0, b0). Layer-level
                  cases only; ``None`` for model-level variants, which give ``reference_model``.
    reference_model -- ``reference_model(model, base_model, ids) -> logits`` for model-level
                  variants (prefix, prompt): expected logits of the adapted ``model``
                  from the unadapted ``base_model`` and the adapter tensors.
    trainable  -- ``trainable(layer) -> set of parameter names`` (relative to the layer) that must
                  require grad -- exactly the paper's tensors.
    count      -- ``count(layer) -> int``: the paper's trainable-parameter formula for this layer
                  (shared tensors: count them once per apply, see ``count_model``).
    count_model -- optional ``count_model(model) -> int`` replacing the per-layer sum (tied tensors).
    equals_base_at_init -- outputs equal the base model's right after apply.
    base_spec  -- family -> a spec that builds the model to compare with at init when the base
                  itself changes (``mlp.* -> freeze on nf4`` for a case that adapts an nf4 base).
    mergeable  -- merge/unmerge tests run.
    perturb    -- optional ``perturb(layer, generator)``: make the adapter non-trivial; default adds
                  N(0, 0.1) noise to every trainable tensor.
    unsupported -- family -> a spec line that targets a module type the variant cannot wrap.
    input      -- ``input(layer, generator) -> x`` for the layer-level forward test (default:
                  float (2, 5, in_features), or token ids for embeddings).
    atol       -- tolerance of the forward comparison.
    """

    variant: str
    specs: dict[str, str]
    trainable: Callable[[Any], set[str]]
    count: Callable[[Any], int]
    reference: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    reference_model: Callable[[Any, Any, torch.Tensor], torch.Tensor] | None = None
    count_model: Callable[[Any], int] | None = None
    equals_base_at_init: bool = True
    mergeable: bool = True
    perturb: Callable[[Any, torch.Generator], None] | None = None
    unsupported: dict[str, str] = field(default_factory=dict)
    input: Callable[[Any, torch.Generator], torch.Tensor] | None = None
    atol: float = 1e-5
    base_spec: dict[str, str] = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or self.variant


def all_cases() -> list[VariantCase]:
    cases: list[VariantCase] = []
    for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod.name.startswith("case_"):
            cases.extend(importlib.import_module(f"{__name__}.{mod.name}").CASES)
    return cases


def base_weight_out_in(layer) -> torch.Tensor:
    """W0 as ``out x in`` straight from the wrapped module (GPT-2 Conv1D stores it transposed)."""
    base = layer.base_layer
    if hasattr(base, "dequantize"):
        return base.dequantize()
    if type(base).__name__ == "Conv1D":
        return base.weight.t()
    return base.weight


def base_bias(layer) -> torch.Tensor | None:
    return getattr(layer.base_layer, "bias", None)


def linear_base(layer, x: torch.Tensor) -> torch.Tensor:
    """W0 x + b0 computed from the tensors (not by calling the base module)."""
    y = x @ base_weight_out_in(layer).t()
    b = base_bias(layer)
    return y + b if b is not None else y
