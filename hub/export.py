"""``adapterhub export SRC --to peft``: any mergeable adapter as a plain PEFT LoRA.

For every adapter layer the weight update ``ΔW = delta_weight()`` (taken to ``out x in``: GPT-2's
Conv1D and embeddings store the transpose) is factorised by a truncated SVD

    ΔW = U S Vᵀ,   B = U_r √S_r  (out x r),   A = √S_r V_rᵀ  (r x in),   lora_alpha = r  (scaling 1)

so ``B A`` is the best rank-``r`` approximation of ``ΔW`` (Eckart–Young); its relative error
``‖ΔW − B A‖_F / ‖ΔW‖_F`` is reported per module (0 up to float rounding when ``r`` reaches the
rank of ``ΔW``). ``r`` is ``--rank`` if given, else the layer's own rank (``r``; ``n·r`` for
MultiLoRA, whose update is a rank-``n·r`` LoRA), else 16; it is capped at ``min(out, in)`` (full
rank: exact). Ranks that differ between modules go to ``rank_pattern``/``alpha_pattern``.

A variant that also changes the bias (``delta_bias()``: IA3 output-side on a biased layer, GLoRA's
``E``/``W0 C``/``D``) cannot be expressed by ``B A`` alone; PEFT's ``lora_bias=True`` adds a bias to
``lora_B`` (scaled by 1 here), so the export writes ``lora_B.bias = Δb`` and stays exact in the bias
too (layers without a bias change get a zero bias). PEFT warns that such an adapter cannot be merged
into a base layer without a bias (Llama); the forward is exact. ``train`` modules become
``modules_to_save``. Not-mergeable adapters (prefix, prompt, bottleneck) are refused.

On a quantized base (``... on nf4``) ``ΔW`` is taken against the dequantized base weight, exactly as
adapterhub computes the adapted model; PEFT users should load the base the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adapterhub.registry import AdapterhubError, AdapterLayer, NotMergeableError

from .atomic import atomic_dir
from .peft_format import (
    CONFIG,
    LORA_DEFAULTS,
    PREFIX,
    auto_mapping,
    base_module_names,
    config_json,
    pattern_keys,
    peft_task_type,
    target_list,
)
from .peft_read import resolve_peft
from .train_head import model_for_manifest, task_of

DEFAULT_RANK = 16


@dataclass
class ModuleReport:
    """One exported module: its shape (``out x in``), the rank written, and what was lost."""

    module: str
    variant: str
    kind: str
    out_features: int
    in_features: int
    rank: int
    rel_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F (0 when ΔW = 0)
    delta_norm: float  # ‖ΔW‖_F
    bias_norm: float | None = None  # ‖Δb‖ when the variant changes the bias, else None


@dataclass
class ExportReport:
    """What :func:`export_peft` wrote."""

    out: str
    source: str
    base_model: str | None
    modules: list[ModuleReport]
    lora_bias: bool
    modules_to_save: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"out": self.out, "source": self.source, "base_model": self.base_model, "lora_bias": self.lora_bias,
                "modules_to_save": self.modules_to_save, "max_rel_error": self.max_error, "notes": self.notes,
                "modules": [asdict(m) for m in self.modules]}


def lowrank(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, rel_error)``: the rank-``r`` truncated SVD of ``delta`` (``out x in``) split as
    ``B = U_r √S_r``, ``A = √S_r V_rᵀ`` (float32), and ``‖delta − B A‖_F / ‖delta‖_F``."""
    d = delta.detach().to("cpu", torch.float64)
    r = max(1, min(int(r), *d.shape))
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    root = s[:r].sqrt()
    b = (u[:, :r] * root).to(torch.float32)
    a = (root[:, None] * vh[:r]).to(torch.float32)
    norm = torch.linalg.matrix_norm(d).item()
    err = torch.linalg.matrix_norm(d - b.double() @ a.double()).item() / norm if norm > 0 else 0.0
    return b, a, err


def own_rank(layer: AdapterLayer) -> int | None:
    """The rank a layer's update has by construction, when it has one."""
    r = getattr(layer, "r", None)
    if not isinstance(r, int) or isinstance(r, bool):
        return None
    n = getattr(layer, "n", None) if layer.variant == "multilora" else None
    return r * n if isinstance(n, int) else r


def _check_mergeable(layers: list[tuple[str, AdapterLayer]]) -> None:
    from adapterhub.registry import get_registry

    variants = get_registry().variants
    bad = [(n, layer.variant) for n, layer in layers
           if layer.attached or not getattr(variants.get(layer.variant), "mergeable", True)]
    if bad:
        kinds = sorted({v for _, v in bad})
        raise NotMergeableError(
            f"cannot export to PEFT LoRA: {', '.join(kinds)} adapter{'s have' if len(kinds) > 1 else ' has'} no "
            f"weight-space form ({len(bad)} modules, e.g. '{bad[0][0]}'); only mergeable adapters can become LoRA")


def _base_model(source_dir: Path, model: str | nn.Module | None) -> tuple[nn.Module, str | None]:
    """The base model to rebuild the adapter on, and its name for the config."""
    from .bundle import MANIFEST, read_manifest
    from .models import BUILTIN_MODELS
    from .peft_read import read_config

    manifest: dict[str, Any] = {}
    if (source_dir / MANIFEST).is_file():
        manifest = read_manifest(source_dir)
        name = manifest.get("base_model")
    else:
        config = read_config(source_dir)
        if config is None:
            raise AdapterhubError(f"'{source_dir}' is not a bundle: it has neither {MANIFEST} nor {CONFIG}")
        name = config.get("base_model_name_or_path")
    if isinstance(model, nn.Module):
        return model, name
    if model is not None:
        return model_for_manifest(model, manifest, source_dir), name or model
    if name and (name in BUILTIN_MODELS or Path(name).expanduser().is_dir()):
        return model_for_manifest(name, manifest, source_dir), name
    raise AdapterhubError(f"the bundle's base model {name!r} is neither a built-in model nor a local directory; "
                          "pass --model (a built-in name, a local directory or a cached Hub id)")


def export_peft(source: str | Path, out: str | Path, *, model: str | nn.Module | None = None,
                rank: int | None = None, check_base: bool = True) -> ExportReport:
    """Write the adapter named by ``source`` as a plain PEFT LoRA to ``out`` (see the module docstring).

    ``model``: the base model (a ``--model`` string or a fresh ``nn.Module``); default: the bundle's
    ``base_model`` when it is a built-in name or a local directory.
    """
    from .bundle import load
    from .sources import bundle_dir
    from .surgery import adapter_layers, applied

    if rank is not None and rank <= 0:
        raise AdapterhubError(f"--rank must be a positive integer, got {rank}")
    source_dir = bundle_dir(source)
    base, base_name = _base_model(source_dir, model)
    load(base, source_dir, check_base=check_base)
    layers = sorted(adapter_layers(base))
    _check_mergeable(layers)
    tensors: dict[str, torch.Tensor] = {}
    reports: list[ModuleReport] = []
    biases: dict[str, torch.Tensor | None] = {}
    with torch.no_grad():
        for name, layer in layers:
            delta = layer.delta_weight().detach()
            if layer.kind in ("conv1d", "embedding"):
                delta = delta.t()
            r = rank or own_rank(layer) or DEFAULT_RANK
            b, a, err = lowrank(delta, r)
            db = layer.delta_bias()
            biases[name] = None if db is None else db.detach().to("cpu", torch.float32).reshape(-1)
            if layer.kind == "embedding":
                tensors[f"{PREFIX}{name}.lora_embedding_A"] = a.contiguous()
                tensors[f"{PREFIX}{name}.lora_embedding_B"] = b.contiguous()
            else:
                tensors[f"{PREFIX}{name}.lora_A.weight"] = a.contiguous()
                tensors[f"{PREFIX}{name}.lora_B.weight"] = b.contiguous()
            reports.append(ModuleReport(name, layer.variant, layer.kind, delta.shape[0], delta.shape[1], a.shape[0],
                                        err, torch.linalg.matrix_norm(delta.double()).item(),
                                        None if db is None else torch.linalg.vector_norm(db.double()).item()))
    lora_bias = any(v is not None for v in biases.values())
    if lora_bias:
        embeddings = [r.module for r in reports if r.kind == "embedding"]
        if embeddings:
            raise AdapterhubError(f"cannot export: some adapters change biases (PEFT's lora_bias) and "
                                  f"'{embeddings[0]}' is an embedding, for which PEFT has no lora_bias")
        for rep in reports:
            bias = biases[rep.module]
            tensors[f"{PREFIX}{rep.module}.lora_B.bias"] = (torch.zeros(rep.out_features) if bias is None
                                                            else bias.contiguous())
    info = applied(base)
    assert info is not None
    train = sorted(e.module for e in info.plan.entries if e.action == "train")
    for module in train:
        for key, t in base.get_submodule(module).state_dict().items():
            tensors[f"{PREFIX}{module}.{key}"] = t.detach().to("cpu").contiguous().clone()
    config = _config(base, reports, train, lora_bias, base_name)
    notes = _notes(info, reports, lora_bias)
    report = ExportReport(str(out), str(source), base_name, reports, lora_bias, train, notes)
    with atomic_dir(Path(out)) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(config_json(config))
        (tmp / "README.md").write_text(export_card(report, info.plan.spec.source))
    return report


def _config(model: nn.Module, reports: list[ModuleReport], train: list[str], lora_bias: bool,
            base_name: str | None) -> dict[str, Any]:
    ranks = {rep.module: rep.rank for rep in reports}
    r = Counter(ranks.values()).most_common(1)[0][0]
    names = base_module_names(model)
    config = {**LORA_DEFAULTS, "auto_mapping": auto_mapping(model), "base_model_name_or_path": base_name,
              "target_modules": target_list(list(ranks), names), "r": r, "lora_alpha": r,
              "rank_pattern": pattern_keys(ranks, r), "alpha_pattern": pattern_keys(ranks, r),
              "fan_in_fan_out": any(rep.kind == "conv1d" for rep in reports), "modules_to_save": train or None}

    def selects_exactly(c: dict[str, Any]) -> bool:
        check = resolve_peft(c, model, names)
        return {m: p["r"] for m, (_, p) in check.variants.items()} == ranks and sorted(check.train) == train

    task_type = peft_task_type(task_of(model))  # a classifier: SEQ_CLS, unless PEFT would then train more
    typed = {**config, "task_type": task_type, "auto_mapping": None}
    if task_type is not None and _quietly(selects_exactly, typed):
        config = typed
    elif not selects_exactly(config):
        raise AdapterhubError("internal error: the exported adapter_config.json does not select the exported "
                              "modules with their ranks")
    config["lora_bias"] = lora_bias
    return config


def _quietly(check: Any, config: dict[str, Any]) -> bool:
    """``check(config)``, False where PEFT could not resolve the config at all (e.g. an adapted head)."""
    try:
        return bool(check(config))
    except AdapterhubError:
        return False


def _notes(info: Any, reports: list[ModuleReport], lora_bias: bool) -> list[str]:
    notes = []
    quants = sorted({e.quant for e in info.plan.entries if e.action == "variant" and e.quant})
    if quants:
        notes.append(f"the source adapter sits on a base quantized with {', '.join(quants)}: ΔW was taken against "
                     "the dequantized weights; load the base the same way for the closest outputs")
    if lora_bias:
        n = sum(r.bias_norm is not None for r in reports)
        notes.append(f"{n} modules change their bias: written as lora_B.bias (PEFT's lora_bias=True)")
    lossy = [r for r in reports if r.rel_error > 1e-4]
    if lossy:
        worst = max(lossy, key=lambda r: r.rel_error)
        notes.append(f"{len(lossy)} modules are truncated (largest relative error {worst.rel_error:.3g} at "
                     f"'{worst.module}'); a larger --rank lowers the error")
    return notes


def export_card(report: ExportReport, spec: str) -> str:
    """README.md of an export: PEFT front matter, the per-module error table, the source spec."""
    variants = sorted({m.variant for m in report.modules})
    base = report.base_model or ""
    lines = ["---"]
    if base and not base.startswith(("/", ".", "~")):
        lines.append(f"base_model: {base}")
    lines += ["library_name: peft", "tags:", "- adapterhub", "- peft", "- lora", "- adapterhub-export"]
    lines += [f"- {v}" for v in variants if v != "lora"]
    lines += ["---", "", f"# LoRA export of {report.source}", "",
              f"A plain PEFT LoRA made by `adapterhub export --to peft` from a {', '.join(variants)} adapter: "
              "each module's ΔW was factorised by a truncated SVD (B = U√S, A = √S Vᵀ, lora_alpha = r).", "",
              "```python", "from peft import PeftModel",
              "model = PeftModel.from_pretrained(base_model, \"path/to/this/directory\")", "```", ""]
    lines += [f"Note: {n}." for n in report.notes] + ([""] if report.notes else [])
    lines += ["## Per-module error", "", "| module | variant | out x in | rank | rel. error | bias Δ |",
              "|---|---|---|---|---|---|"]
    for m in report.modules:
        bias = "" if m.bias_norm is None else f"{m.bias_norm:.3g}"
        lines.append(f"| {m.module} | {m.variant} | {m.out_features}x{m.in_features} | {m.rank} | "
                     f"{m.rel_error:.3g} | {bias} |")
    lines += ["", "## Source spec", "", "```", spec.rstrip(), "```", ""]
    return "\n".join(lines)


def format_error(x: float) -> str:
    """A relative error for a table: ``0`` or 3 significant digits."""
    return "0" if x == 0 else f"{x:.2e}"
