"""``adapterhub compose A B [C ...] --method M --weights w1,w2,...``: several adapters → one LoRA bundle.

Works on every mergeable variant through its weight delta. The adapters are rebuilt on their base
model (``--model``; default the manifests' ``base_model`` when it is a built-in name or a local
directory; all bundles must carry the same base fingerprint) -- stacked on one copy of it with
:func:`adapterhub.stacking.stack`, so the base is loaded once -- and for every module that any of them
adapts, with ``ΔW_i`` (``out x in``) and ``Δb_i`` (``delta_bias()``, 0 where an adapter has none) of
the adapters ``i`` present there,

    ΔW = method.merge([ΔW_i], [w_i], params),   Δb = method.merge([Δb_i], [w_i], params)

through the ``register_merge_methods`` hook (``linear`` -- the exact ``Σ w_i ΔW_i``; ``cat``; ``svd``;
``ties``; ``dare_linear``; ``dare_ties``; or a third-party method). A module present in only some
adapters gets the combination of those present. ``ΔW`` is then written as a LoRA
(``lora(r=R, alpha=R)``: scaling 1) with the truncated SVD ``B = U_R √S_R``, ``A = √S_R V_Rᵀ`` and its
relative error ``‖ΔW − B A‖_F / ‖ΔW‖_F`` is reported per module. A method with ``merge_factors``
(``cat``) gives ``B``, ``A`` directly (exact, no SVD). The rank ``R``:

* ``--rank`` when given;
* else for methods whose result is a linear combination of the inputs (``sum_rank``: ``linear``,
  ``cat``) ``Σ_i r_i`` -- at least the rank of ``Σ w_i ΔW_i``, so the composed LoRA is exact;
* else the largest ``r_i`` (``ties``/``dare`` results are not low-rank: the error says how much
  the truncation loses; ``svd`` truncates to it by definition);

capped at ``min(out, in)``. ``r_i`` is a LoRA's own rank (its factors ``s B``, ``A`` are used as
they are) and for other variants the numerical rank of ``ΔW_i`` (exact factors from its SVD).

Modules whose combined bias delta is non-zero (IA3 on a biased layer, GLoRA) become
``glora(a=none, b=lora, c=none, d=none, e=vector, r=R)``: ``ΔW = Xd Xu`` and ``Δb = E`` exactly --
adapterhub loads it; such a bundle has no ``adapter_config.json`` (``adapterhub export --to peft``
turns it into a PEFT LoRA with ``lora_bias``). Otherwise the bundle is plain LoRA and carries PEFT's
``adapter_config.json``. A base quantized by the inputs (``on nf4``) is kept when they agree.
Adapters that cannot be merged (bottleneck, prefix, prompt) and ``train`` rules are refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterhub.registry import AdapterhubError, AdapterLayer, MergeMethod, Registry, bind, get_registry, to_dict

from .rebuild import Entry, bundle_entries, common_quant
from .stacking import StackLayer, stack_bundles


@dataclass
class ComposedModule:
    """One module of the composed adapter."""

    module: str
    kind: str
    variants: list[str]  # of the inputs present, in input order
    inputs: list[int]  # which inputs adapt it
    out_features: int
    in_features: int
    rank: int
    rel_error: float  # ‖ΔW − B A‖_F / ‖ΔW‖_F
    delta_norm: float
    bias: bool  # written with a bias delta (glora)


@dataclass
class ComposeReport:
    """What :func:`compose` wrote."""

    out: str
    method: str
    weights: list[float]
    params: dict[str, Any]
    sources: list[str]
    base_model: str | None
    modules: list[ComposedModule]
    spec: str
    notes: list[str] = field(default_factory=list)

    @property
    def max_error(self) -> float:
        return max((m.rel_error for m in self.modules), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"out": self.out, "method": self.method, "weights": self.weights, "params": self.params,
                "sources": self.sources, "base_model": self.base_model, "max_rel_error": self.max_error,
                "notes": self.notes, "spec": self.spec, "modules": [asdict(m) for m in self.modules]}


# --------------------------------------------------------------------------- factors


def out_in(layer: AdapterLayer, t: torch.Tensor) -> torch.Tensor:
    """A delta in the base module's layout → ``out x in``."""
    return t.t() if layer.kind in ("conv1d", "embedding") else t


def _svd(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(delta.detach().to("cpu", torch.float64), full_matrices=False)


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = U_r √S_r``, ``A = √S_r V_rᵀ`` (float32)."""
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()


def exact_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, A)`` with ``B A = delta`` up to rounding: the SVD cut at the numerical rank (singular
    values above ``σ_max · max(out, in) · eps_fp32``)."""
    u, s, vh = _svd(delta)
    tol = (s[0].item() if s.numel() else 0.0) * max(delta.shape) * torch.finfo(torch.float32).eps
    return _split(u, s, vh, int((s > tol).sum().item()) if tol > 0 else 0)


def layer_factors(layer: AdapterLayer, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA's own factors ``(s B, A)`` (``out x r``, ``r x in``), else :func:`exact_factors` of ``delta``."""
    from adapterhub.plugins.lora import LoraLayer

    if isinstance(layer, LoraLayer) and type(layer).delta_weight is LoraLayer.delta_weight:
        if layer.kind == "embedding":
            b, a = layer.lora_embedding_B, layer.lora_embedding_A
        else:
            b, a = layer.lora_B.weight, layer.lora_A.weight
        return (b.detach().float() * layer.scaling).cpu(), a.detach().float().cpu()
    return exact_factors(delta)


def lowrank(delta: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``r`` truncated SVD of ``delta`` split as ``B = U_r √S_r``, ``A = √S_r V_rᵀ``."""
    return _split(*_svd(delta), max(1, min(int(r), *delta.shape)))


def relative_error(delta: torch.Tensor, b: torch.Tensor, a: torch.Tensor) -> tuple[float, float]:
    """``(‖delta − B A‖ / ‖delta‖, ‖delta‖)`` in float64 (error 0 when ``delta`` is 0)."""
    d = delta.detach().to("cpu", torch.float64)
    norm = torch.linalg.matrix_norm(d).item()
    if norm == 0:
        return 0.0, 0.0
    return torch.linalg.matrix_norm(d - b.double() @ a.double()).item() / norm, norm


# --------------------------------------------------------------------------- compose


def _method(registry: Registry, name: str) -> MergeMethod:
    if name not in registry.merge_methods:
        raise AdapterhubError(f"unknown merge method '{name}' (installed: {', '.join(sorted(registry.merge_methods))})")
    return registry.merge_methods[name]


def _check_same_base(sources: Sequence[str], manifests: Sequence[dict[str, Any] | None]) -> str | None:
    """Refuse adapters whose manifests name different base fingerprints; the base model's name."""
    fps: dict[str, str] = {}
    for src, m in zip(sources, manifests, strict=True):
        fp = (m or {}).get("base_fingerprint")
        if fp:
            fps.setdefault(fp, src)
    if len(fps) > 1:
        (fa, sa), (fb, sb) = list(fps.items())[:2]
        raise AdapterhubError(f"cannot compose adapters made for different base models: '{sa}' ({fa[:19]}...) and "
                              f"'{sb}' ({fb[:19]}...)")
    return next(((m or {}).get("base_model") for m in manifests if (m or {}).get("base_model")), None)


def _module_params(params: Any, module: str, rank: int, rank_given: bool) -> Any:
    names = {f.name for f in dataclasses.fields(params)}
    changes: dict[str, Any] = {}
    if "seed" in names:  # one mask per module, not the same mask for every equally-shaped module
        changes["seed"] = zlib.crc32(f"{params.seed}:{module}".encode())
    if "rank" in names and not rank_given:
        changes["rank"] = rank
    return dataclasses.replace(params, **changes) if changes else params


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _quant_clause(entry: Entry | None) -> str:
    if entry is None or not entry.quant:
        return ""
    args = ", ".join(f"{k}={_fmt(v)}" for k, v in entry.quant_params.items())
    return f" on {entry.quant}({args})" if args else f" on {entry.quant}"


def composed_spec(rules: dict[str, str], header: list[str]) -> str:
    """Spec text: one rule per group of modules with the same action (``{module: action text}``)."""
    from .peft_read import compress_names

    roles = set(get_registry().alias_table())
    groups: dict[str, list[str]] = {}
    for module, action in rules.items():
        groups.setdefault(action, []).append(module)
    lines = [f"# {h}" for h in header]
    for action, modules in groups.items():
        lines += [f"{p} -> {action}" for p in compress_names(modules, roles)]
    return "\n".join(lines) + "\n"


def compose(sources: Sequence[str | os.PathLike], out: str | os.PathLike, *, method: str = "linear",
            weights: Sequence[float] | None = None, rank: int | None = None, params: dict[str, Any] | None = None,
            model: str | nn.Module | None = None, check_base: bool = True,
            registry: Registry | None = None) -> ComposeReport:
    """Combine the adapters of ``sources`` into one LoRA bundle at ``out`` (see the module docstring).

    ``params`` are the merge method's parameters (``density``, ``seed``, ...); ``rank`` is the output
    rank (and ``svd``'s). ``model``: the base (a ``--model`` string, or an un-adapted module, which is
    copied, not changed).
    """
    from .bundle import MANIFEST, read_manifest, save
    from .models import BUILTIN_MODELS
    from .sources import bundle_dir
    from .surgery import apply
    from .train_head import model_for_manifest

    registry = registry or get_registry()
    merger = _method(registry, method)
    sources = [str(s) for s in sources]
    if len(sources) < 1:
        raise AdapterhubError("compose needs at least one adapter")
    weights = [1.0] * len(sources) if weights is None else [float(w) for w in weights]
    if len(weights) != len(sources):
        raise AdapterhubError(f"compose got {len(sources)} adapters but {len(weights)} weights")
    if rank is not None and rank <= 0:
        raise AdapterhubError(f"--rank must be a positive integer, got {rank}")
    values = dict(params or {})
    if rank is not None and "rank" in {f.name for f in dataclasses.fields(merger.Params)}:
        values["rank"] = rank
    bound = bind(merger.Params, values, owner=f"merge method {method}")
    dirs = [bundle_dir(s) for s in sources]
    manifests = [read_manifest(d) if (d / MANIFEST).is_file() else None for d in dirs]
    base_name = _check_same_base(sources, manifests)
    if model is None:
        if not (base_name and (base_name in BUILTIN_MODELS or Path(base_name).expanduser().is_dir())):
            raise AdapterhubError(f"the adapters' base model {base_name!r} is neither a built-in model nor a local "
                                  "directory; pass --model (a built-in name, a local directory or a cached Hub id)")
        model = base_name
    if isinstance(model, str):
        base_name = base_name or model
        probe, target = model_for_manifest(model, manifests[0], sources[0]), None  # a classifier: its head
    else:
        probe, target = copy.deepcopy(model), copy.deepcopy(model)  # the caller's module stays as it is
    infos = [bundle_entries(s, probe, d) for s, d in zip(sources, dirs, strict=True)]
    for info in infos:
        for e in info.entries:
            v = registry.variants.get(e.variant or "")
            if e.action == "variant" and v is not None and not v.mergeable:
                raise AdapterhubError(f"cannot compose '{info.source}': {e.variant} adapters (module '{e.module}') "
                                      "have no weight-space form and cannot be merged")
    quant = common_quant(infos, "compose")
    stacked = stack_bundles(probe, infos, check_base=check_base, registry=registry, what="compose")
    rules: dict[str, str] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
    reports: list[ComposedModule] = []
    with torch.no_grad():
        for name, layer in stacked.named_modules():
            if not isinstance(layer, StackLayer):
                continue
            report, fac = _compose_module(name, layer, merger, bound, weights, rank)
            reports.append(report)
            factors[name] = fac
            r = report.rank
            action = (f"glora(a=none, b=lora, c=none, d=none, e=vector, r={r})" if report.bias
                      else f"lora(r={r}, alpha={r})")
            rules[name] = action + _quant_clause(quant[name][0])
    for name, (entry, _) in quant.items():
        if entry.action == "freeze" and entry.quant and name not in rules:
            rules[name] = "freeze" + _quant_clause(entry)
    shown = ", ".join(f"{k}={v}" for k, v in to_dict(bound).items())
    header = [f"composed by adapterhub compose --method {method}" + (f" ({shown})" if shown else "")
              + f" --weights {','.join(f'{w:g}' for w in weights)}", *[f"  from {s}" for s in sources]]
    spec = composed_spec(rules, header)
    del stacked, probe
    target = target if target is not None else model_for_manifest(model, manifests[0], sources[0])
    apply(target, spec, seed=0)
    _fill(target, factors)
    save(target, out)
    notes = _notes(reports, quant)
    return ComposeReport(str(out), method, weights, to_dict(bound), sources, base_name, reports, spec, notes)


def _compose_module(name: str, layer: StackLayer, merger: MergeMethod, params: Any, weights: list[float],
                    rank: int | None) -> tuple[ComposedModule, tuple]:
    layers = layer.layers()
    idx = sorted(layers)
    deltas, biases, facs = [], [], []
    for i in idx:
        sub = layers[i]
        d = out_in(sub, sub.delta_weight().detach()).float().cpu()
        deltas.append(d)
        db = sub.delta_bias()
        biases.append(None if db is None else db.detach().float().cpu().reshape(-1))
        facs.append(layer_factors(sub, d))
    w = [weights[i] for i in idx]
    ranks = [a.shape[0] for _, a in facs]
    full = min(deltas[0].shape)
    sum_rank = bool(getattr(merger, "sum_rank", False))
    r_out = rank or (sum(ranks) if sum_rank else max(ranks))
    r_out = max(1, min(r_out, full))
    p = _module_params(params, name, r_out, rank is not None)
    merged = merger.merge(deltas, w, p).float()
    bias = None
    if any(b is not None for b in biases):
        zeros = torch.zeros(deltas[0].shape[0])
        bias = merger.merge([zeros if b is None else b for b in biases], w, p).float()
        if not bool(bias.abs().gt(0).any()):
            bias = None
    fac_merge = getattr(merger, "merge_factors", None)
    if callable(fac_merge) and rank is None and 0 < sum(ranks) <= full:
        b, a = fac_merge(facs, w, p)
        b, a = b.float(), a.float()
    else:
        b, a = lowrank(merged, r_out)
    err, norm = relative_error(merged, b, a)
    variants = [layers[i].variant for i in idx]
    report = ComposedModule(name, layer.kind, variants, idx, merged.shape[0], merged.shape[1], a.shape[0], err, norm,
                            bias is not None)
    return report, (b, a, bias)


def _fill(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]) -> None:
    with torch.no_grad():
        for name, (b, a, bias) in factors.items():
            layer = model.get_submodule(name)
            if bias is not None:
                targets = [(layer.glora_B["Xd"], b), (layer.glora_B["Xu"], a), (layer.glora_E["X"], bias)]
            elif layer.kind == "embedding":
                targets = [(layer.lora_embedding_B, b), (layer.lora_embedding_A, a)]
            else:
                targets = [(layer.lora_B.weight, b), (layer.lora_A.weight, a)]
            for t, v in targets:
                if tuple(t.shape) != tuple(v.shape):
                    raise AdapterhubError(f"internal error: composed tensor for '{name}' has shape {tuple(v.shape)}, "
                                          f"the layer holds {tuple(t.shape)}")
                t.copy_(v.to(t.dtype))


def _notes(reports: list[ComposedModule], quant: dict[str, tuple[Entry, str]]) -> list[str]:
    notes = []
    lossy = [r for r in reports if r.rel_error > 1e-4]
    if lossy:
        worst = max(lossy, key=lambda r: r.rel_error)
        notes.append(f"{len(lossy)} of {len(reports)} modules are truncated to their rank (largest relative error "
                     f"{worst.rel_error:.3g} at '{worst.module}'); a larger --rank lowers the error")
    biased = [r.module for r in reports if r.bias]
    if biased:
        notes.append(f"{len(biased)} modules change their bias and are written as glora(b=lora, e=vector) (e.g. "
                     f"'{biased[0]}'): adapterhub loads the bundle; `adapterhub export --to peft` makes a PEFT LoRA "
                     "with lora_bias")
    quants = sorted({e.quant for e, _ in quant.values() if e.quant})
    if quants:
        notes.append(f"the inputs sit on a base quantized with {', '.join(quants)}; the composed adapter keeps it")
    return notes
