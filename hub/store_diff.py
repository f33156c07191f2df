"""``adapterhub diff``: what changed between two bundles, without loading a base model.

* the spec texts, as a unified diff; base model and metrics that differ;
* per module the relative change of the weight update, ``||dW2 - dW1||_F / ||dW1||_F``:

  - LoRA-style factors (``lora``, ``lora_fa``, ``loftq``; ``lora_A``/``lora_B`` or
    ``lora_embedding_A``/``lora_embedding_B``): ``dW = s B A`` with ``s = alpha / r`` (``alpha /
    sqrt(r)`` with ``rslora``) from the manifest's params -- exact even when the rank changed;
  - ``multilora``: ``dW = (alpha / r) sum_i diag(s_i) B_i A_i``;
  - every other variant (DoRA, VeRA, IA3, GLoRA, prefix, ... whose dW needs the base weights or
    tensors shared across modules) and ``train`` modules: the relative change of the module's
    own tensors taken together, ``sqrt(sum ||t2 - t1||^2 / sum ||t1||^2)``, labelled ``tensors``.

Large updates (``out * in > 2^24``) are never materialised: ``||P Q||_F^2 = sum((P^T P) * (Q Q^T))``.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .bundle import PREFIX, WEIGHTS, read_manifest

LORA_LIKE = frozenset({"lora", "lora_fa", "loftq"})
MATERIALISE_LIMIT = 1 << 24
FACTORS = "ΔW = s·B·A"
MULTI = "ΔW = (α/r)·Σ diag(sᵢ)·Bᵢ·Aᵢ"
TENSORS = "tensors"


@dataclass
class ModuleChange:
    """One module's row: ``change`` is ``||dW2 - dW1|| / ||dW1||`` (None when it cannot be given)."""

    module: str
    variant: str
    method: str
    change: float | None
    norm_a: float | None = None
    norm_b: float | None = None
    note: str = ""


def _tensors(directory: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The bundle's tensors grouped by module (longest manifest module name that prefixes the key)."""
    modules = sorted(read_manifest(directory).get("modules", {}), key=len, reverse=True)
    out: dict[str, dict[str, torch.Tensor]] = {}
    path = directory / WEIGHTS
    if not path.is_file():
        return out
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            name = key.removeprefix(PREFIX)
            module = next((m for m in modules if name.startswith(m + ".")), "(other)")
            out.setdefault(module, {})[name[len(module) + 1:] if module != "(other)" else name] = \
                f.get_tensor(key).to(torch.float64)
    return out


Factors = tuple[torch.Tensor, torch.Tensor]


def _factors(variant: str, params: dict[str, Any], ts: dict[str, torch.Tensor]) -> Factors | None:
    """``(P, Q)`` with ``dW = P @ Q`` (out x k, k x in) from the saved factors, or None."""
    try:
        r, alpha = int(params["r"]), float(params["alpha"])
    except (KeyError, TypeError, ValueError):
        return None
    if variant in LORA_LIKE:
        s = alpha / math.sqrt(r) if params.get("rslora") else alpha / r
        for a, b in (("lora_A.weight", "lora_B.weight"), ("lora_embedding_A", "lora_embedding_B")):
            if set(ts) == {a, b} and ts[a].dim() == 2 and ts[b].dim() == 2 and ts[b].shape[1] == ts[a].shape[0]:
                return ts[b] * s, ts[a]
        return None
    if variant == "multilora":
        n = len([k for k in ts if k.startswith("lora_scale.")])
        want = {f"{p}.{i}{w}" for i in range(n) for p, w in (("lora_A", ".weight"), ("lora_B", ".weight"),
                                                                 ("lora_scale", ""))}
        if n == 0 or set(ts) != want:
            return None
        s = alpha / r
        p = torch.cat([ts[f"lora_B.{i}.weight"] * ts[f"lora_scale.{i}"][:, None] * s for i in range(n)], dim=1)
        q = torch.cat([ts[f"lora_A.{i}.weight"] for i in range(n)], dim=0)
        return p, q
    return None


def _lowrank_norms(f1: Factors, f2: Factors) -> tuple[float, float, float]:
    """``(||dW1||, ||dW2||, ||dW2 - dW1||)`` for ``dW = P @ Q``."""
    (p1, q1), (p2, q2) = f1, f2
    if p1.shape[0] * q1.shape[1] <= MATERIALISE_LIMIT:
        d1, d2 = p1 @ q1, p2 @ q2
        return d1.norm().item(), d2.norm().item(), (d2 - d1).norm().item()

    def sq(p: torch.Tensor, q: torch.Tensor) -> float:
        return max(((p.T @ p) * (q @ q.T)).sum().item(), 0.0)

    return (math.sqrt(sq(p1, q1)), math.sqrt(sq(p2, q2)),
            math.sqrt(sq(torch.cat([p2, -p1], 1), torch.cat([q2, q1], 0))))


def _ratio(diff: float, base: float, norm_b: float) -> tuple[float | None, str]:
    if base > 0:
        return diff / base, ""
    return (0.0, "") if norm_b == 0 else (None, "the first is zero (e.g. freshly initialised): no ratio")


def _module_change(module: str, e1: dict | None, e2: dict | None, t1: dict, t2: dict) -> ModuleChange:
    v1 = (e1 or {}).get("variant") or (e1 or {}).get("action") or "?"
    v2 = (e2 or {}).get("variant") or (e2 or {}).get("action") or "?"
    variant = v1 if v1 == v2 else f"{v1} → {v2}"
    if e1 is None or e2 is None:
        return ModuleChange(module, variant if e1 is None else v1, "added" if e1 is None else "removed", None)
    f1 = _factors(v1, e1.get("params") or {}, t1)
    f2 = _factors(v2, e2.get("params") or {}, t2)
    if f1 is not None and f2 is not None and f1[0].shape[0] == f2[0].shape[0] and f1[1].shape[1] == f2[1].shape[1]:
        na, nb, nd = _lowrank_norms(f1, f2)
        change, note = _ratio(nd, na, nb)
        method = MULTI if "multilora" in (v1, v2) else FACTORS
        return ModuleChange(module, variant, method, change, na, nb, note)
    if v1 != v2:
        return ModuleChange(module, variant, TENSORS, None, note="the variant changed: tensors not comparable")
    if set(t1) != set(t2):
        return ModuleChange(module, variant, TENSORS, None, note="different tensor names")
    bad = [k for k in t1 if t1[k].shape != t2[k].shape]
    if bad:
        return ModuleChange(module, variant, TENSORS, None,
                            note=f"{bad[0]}: shape {tuple(t1[bad[0]].shape)} → {tuple(t2[bad[0]].shape)}")
    num = sum(((t2[k] - t1[k]) ** 2).sum().item() for k in t1)
    na = math.sqrt(sum((t1[k] ** 2).sum().item() for k in t1))
    nb = math.sqrt(sum((t2[k] ** 2).sum().item() for k in t2))
    change, note = _ratio(math.sqrt(num), na, nb)
    default = "a trained module: its weights compared" if v1 == "train" else "no ΔW without the base model"
    return ModuleChange(module, variant, TENSORS, change, na, nb, note or default)


def spec_diff(spec_a: str, spec_b: str, label_a: str, label_b: str) -> str:
    """A unified diff of two spec texts ("" when equal)."""
    return "".join(difflib.unified_diff(spec_a.splitlines(keepends=True), spec_b.splitlines(keepends=True),
                                        fromfile=f"{label_a} spec", tofile=f"{label_b} spec"))


def diff_bundles(dir_a: Path, dir_b: Path, label_a: str, label_b: str) -> dict[str, Any]:
    """Everything ``adapterhub diff`` shows, as JSON-ready data (see the module docstring)."""
    ma, mb = read_manifest(dir_a), read_manifest(dir_b)
    ta, tb = _tensors(Path(dir_a)), _tensors(Path(dir_b))
    mods_a, mods_b = ma.get("modules", {}), mb.get("modules", {})
    other = "(other)"  # tensors under no module of the manifest
    names = sorted(set(mods_a) | set(mods_b)) + ([other] if other in ta or other in tb else [])

    def entry(mods: dict, tensors: dict, name: str) -> dict | None:
        return ({"action": "tensors"} if name in tensors else None) if name == other else mods.get(name)

    rows = [_module_change(n, entry(mods_a, ta, n), entry(mods_b, tb, n), ta.get(n, {}), tb.get(n, {}))
            for n in names]
    metrics = {k: [ma.get("metrics", {}).get(k), mb.get("metrics", {}).get(k)]
               for k in sorted(set(ma.get("metrics") or {}) | set(mb.get("metrics") or {}))
               if (ma.get("metrics") or {}).get(k) != (mb.get("metrics") or {}).get(k)}
    return {"a": label_a, "b": label_b,
            "spec_diff": spec_diff(ma.get("spec", ""), mb.get("spec", ""), label_a, label_b),
            "base_model": [ma.get("base_model"), mb.get("base_model")],
            "same_base": ma.get("base_fingerprint") == mb.get("base_fingerprint"),
            "metrics": metrics, "modules": [asdict(r) for r in rows]}
