"""Merging adapters into a quantized base: dequantize, add ``ΔW``, keep 16-bit or requantize.

There is no exact merge into NF4 (QLoRA, arXiv 2305.14314; variants.md section 2c): for an adapter
layer on a quantized base ``Q``

    W_merged = deq(Q) + ΔW                     (in fp32, stored in the base's dtype: exact)
    Q'       = quantize(W_merged)              (requantize=True: the same quantizer and parameters)

and ``Q'`` differs from ``deq(Q) + ΔW`` by the quantizer's own rounding. :func:`merge_quantized`
does this for every adapter layer (layers on an unquantized base merge exactly, as in
``merge_and_unload``; a variant whose ``merge`` already yields a quantized base -- QA-LoRA folding
into the zero-points -- keeps it), replaces each adapter layer by its merged base, and measures the
error it introduced on a probe batch:

* per module: ``‖y_merged − y_adapted‖ / ‖y_adapted‖`` -- the module's input and adapted output are
  captured during a forward pass before merging, and the merged module is run on that same input;
* overall: the same ratio for the model's output (logits) before and after merging.

PEFT's ``Linear4bit.merge`` always requantizes (and warns about rounding); here it is on request.
The quantizer's parameters come from the plan ``apply`` recorded (LQ-LoRA's per-matrix choices
included), else from the quantized module's attributes of the same names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapterhub.registry import (
    AdapterhubError,
    AdapterLayer,
    NotMergeableError,
    QuantizedLinear,
    Quantizer,
    bind,
    get_registry,
)

from .surgery import adapter_layers, applied, parent_of


@dataclass
class ModuleChange:
    """One merged adapter layer."""

    module: str
    variant: str
    quant: str | None  # quantizer of the base before merging
    result: str  # dense | requantized | quantized (the variant merged into the quantized form) | removed
    relative_change: float | None  # None for attached adapters (no output of their own)


@dataclass
class MergeReport:
    """What :func:`merge_quantized` did and the output change it caused on the probe batch."""

    requantize: bool
    probe_shape: list[int]
    output_change: float
    modules: list[ModuleChange] = field(default_factory=list)

    @property
    def max_change(self) -> float:
        return max((m.relative_change for m in self.modules if m.relative_change is not None), default=0.0)

    @property
    def mean_change(self) -> float:
        xs = [m.relative_change for m in self.modules if m.relative_change is not None]
        return sum(xs) / len(xs) if xs else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"requantize": self.requantize, "probe_shape": self.probe_shape,
                "output_change": self.output_change, "max_module_change": self.max_change,
                "mean_module_change": self.mean_change,
                "modules": [dataclasses.asdict(m) for m in self.modules]}


# --------------------------------------------------------------------------- helpers


def _relative(new: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double()
    denom = ref.norm().item()
    diff = (new.detach().double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def _main_output(out: Any) -> torch.Tensor:
    """The tensor a model's forward is about: logits, last hidden state, or the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = out.get(key) if isinstance(out, dict) else getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for value in items:
        if isinstance(value, torch.Tensor):
            return value
    raise AdapterhubError(f"cannot find an output tensor in the model's output ({type(out).__name__})")


def _probe_ids(model: nn.Module, probe: torch.Tensor | None) -> torch.Tensor:
    from .kbit import input_embeddings

    emb = input_embeddings(model)
    device = next((t.device for t in [*emb.parameters(), *emb.buffers()]), torch.device("cpu"))
    if probe is not None:
        return probe.to(device)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    vocab = vocab or getattr(emb, "num_embeddings", None) or getattr(emb, "in_features", None)
    if not vocab:
        raise AdapterhubError("cannot tell the vocabulary size for a random probe batch; pass probe=input_ids")
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, int(vocab), (2, 32), generator=gen).to(device)


def _mergeable(layer: AdapterLayer) -> bool:
    variant = get_registry().variants.get(layer.variant)
    return variant.mergeable if variant is not None else True


def quantizer_for(model: nn.Module, name: str, module: QuantizedLinear) -> tuple[Quantizer, Any]:
    """The registered quantizer of ``module`` and its bound parameters (from the plan, else the module)."""
    q = get_registry().quantizers.get(module.quantizer)
    if q is None:
        raise AdapterhubError(f"cannot requantize '{name}': its quantizer '{module.quantizer}' is not registered")
    info = applied(model)
    entry = next((e for e in info.plan.entries if e.module == name), None) if info is not None else None
    if entry is not None and entry.quant == q.name:
        return q, bind(q.Params, dict(entry.quant_params), owner=q.name)
    values, missing = {}, []
    for f in dataclasses.fields(q.Params):
        if f.name == "compute_dtype":
            dtype = getattr(module, "compute_dtype", None)
            values[f.name] = "auto" if dtype is None else str(dtype).removeprefix("torch.")
        elif hasattr(module, f.name):
            values[f.name] = getattr(module, f.name)
        else:
            missing.append(f.name)
    if missing:
        raise AdapterhubError(f"cannot requantize '{name}' with {q.name}: the module does not record "
                              f"{', '.join(missing)} and no plan from apply names them; merge with "
                              "requantize=False")
    return q, bind(q.Params, values, owner=q.name)


# --------------------------------------------------------------------------- merging


def merge_quantized(model: nn.Module, requantize: bool = False, probe: torch.Tensor | None = None) -> MergeReport:
    """Merge every adapter of ``model`` into its base and report the output change.

    Quantized bases are dequantized and merged in fp32; ``requantize=True`` quantizes the merged
    weight again with the same quantizer and parameters (the merged model then holds only
    quantized layers there), else the merged layer is a dense ``nn.Linear`` in the base's dtype.
    ``probe``: input ids for measuring (default: a fixed random batch of 2 x 32 token ids).
    Raises :class:`NotMergeableError` (before changing anything) if an adapter cannot merge.
    """
    layers = list(adapter_layers(model))
    if not layers:
        raise AdapterhubError("this model has no adapter layers to merge")
    for name, layer in layers:
        if not _mergeable(layer):
            raise NotMergeableError(f"adapter '{name}' ({layer.variant}) cannot be merged into the base weights; "
                                    "remove it or keep the model unmerged")
    targets: dict[str, tuple[Quantizer, Any]] = {}
    if requantize:
        for name, layer in layers:
            if isinstance(layer.base_layer, QuantizedLinear):
                targets[name] = quantizer_for(model, name, layer.base_layer)
    ids = _probe_ids(model, probe)
    was_training = model.training
    model.eval()
    captured: dict[str, tuple[tuple, dict, torch.Tensor]] = {}

    def capture(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if name not in captured and isinstance(output, torch.Tensor):
                args = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
                captured[name] = (args, dict(kwargs), output.detach().clone())
        return hook

    handles = [layer.register_forward_hook(capture(name), with_kwargs=True)
               for name, layer in layers if not layer.attached]
    try:
        with torch.no_grad():
            before = _main_output(model(ids)).detach()
    finally:
        for h in handles:
            h.remove()

    changes = []
    with torch.no_grad():
        for name, layer in layers:
            quant = layer.base_layer.quantizer if isinstance(layer.base_layer, QuantizedLinear) else None
            layer.merge()
            new = layer.base_layer
            result = "dense"
            if quant is not None and isinstance(new, QuantizedLinear):
                result = "quantized"
            elif name in targets:
                q, qparams = targets[name]
                new = q.quantize(new, qparams)
                result = "requantized"
            parent, child = parent_of(model, name)
            if layer.attached:
                delattr(parent, child)
                changes.append(ModuleChange(name, layer.variant, quant, "removed", None))
                continue
            setattr(parent, child, new)
            rel = None
            if name in captured:
                args, kwargs, ref = captured.pop(name)
                rel = _relative(new(*args, **kwargs), ref)
            changes.append(ModuleChange(name, layer.variant, quant, result, rel))
        after = _main_output(model(ids)).detach()
    model.__dict__.pop("adapterhub", None)
    model.train(was_training)
    return MergeReport(requantize, list(ids.shape), _relative(after, before), changes)


def merge_report_table(report: MergeReport) -> Any:
    """A rich table: one row per merged module, with its relative output change."""
    from rich.table import Table

    title = f"merge into {'requantized' if report.requantize else '16-bit'} bases, probe {report.probe_shape}"
    table = Table(title=title, title_justify="left")
    for col, just in (("module", "left"), ("variant", "left"), ("base", "left"), ("result", "left"),
                      ("rel. output change", "right")):
        table.add_column(col, justify=just)
    for m in report.modules:
        rel = "-" if m.relative_change is None else f"{m.relative_change:.3e}"
        table.add_row(m.module, m.variant, m.quant or "dense", m.result, rel)
    return table


def print_merge_report(report: MergeReport, console: Any = None) -> None:
    from .report import make_console

    console = console or make_console()
    console.print(merge_report_table(report))
    console.print(f"model output change: {report.output_change:.3e}   per module: max {report.max_change:.3e}, "
                  f"mean {report.mean_change:.3e}", highlight=False)
