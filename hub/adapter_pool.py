"""An adapter pool: hundreds of LoRA adapters for one base model, a different one per batch row.

    pool = AdapterPool(model, max_resident=64)
    pool.add("medical@v2"); pool.add("out/legal-bundle", name="legal")
    with pool.batch(["medical@v2", None, "legal"]):       # one adapter (or None) per row
        logits = model(input_ids=ids).logits              # ids: 3 x T

Every adapter stays in host memory (pinned on CUDA) as its per-module ``A`` (``r x in``), ``B``
(``out x r``) and scaling (``alpha/r``, ``alpha/sqrt(r)`` with rsLoRA), read straight from the bundle's
safetensors + JSON (an adapterhub bundle of ``lora``/``lora_fa`` layers, or a PEFT LoRA directory)
without building a model per adapter and without unpickling. The model's target modules (the union
over all added adapters, wrapped lazily as they appear) become ``slora`` layers
(:mod:`adapterhub.plugins.slora`) whose stacked device buffers hold ``slots <= max_resident`` adapters;
``set_batch`` pages missing adapters in (least recently used ones not in the batch are evicted) and
sets the row -> slot map every layer reads, so a forward is one pass with no per-adapter loop.
Adapters may differ in rank (zero-padded to the largest, or to ``max_rank`` when given) and in the
modules they target (a slot is empty in a layer its adapter does not touch).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from adapterhub.plugins.lora import lora_scaling
from adapterhub.plugins.slora import SLoraLayer, SlotRows, SlotState
from adapterhub.registry import AdapterhubError, AdapterLayer, module_features, module_kind

from .bundle import MANIFEST, PREFIX, WEIGHTS, read_manifest
from .fingerprint import model_fingerprint
from .peft_format import CONFIG
from .peft_read import read_config, resolve_peft
from .sources import bundle_dir
from .surgery import applied, replace_module

#: adapterhub variants whose forward is exactly LoRA's (``s B A x``) with ``lora_A``/``lora_B`` tensors
LORA_VARIANTS = ("lora", "lora_fa")


@dataclass
class HostAdapter:
    """One adapter in host memory: ``{module: (A, B, scaling)}`` (the shapes are fixed once made)."""

    name: str
    directory: Path
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]

    @functools.cached_property
    def rank(self) -> int:
        """The largest rank over its modules (computed once)."""
        return max(a.shape[0] for a, _, _ in self.modules.values())

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.modules.values())


class AdapterPool:
    """LoRA adapters for ``model`` kept on the host, up to ``max_resident`` of them on ``device``.

    ``model``: a plain model (no adapters applied); the pool wraps its target modules in place.
    ``max_rank``: refuse adapters of a higher rank (None: the buffers grow to the largest rank added).
    ``device``: where the slots live (default: the model's). ``dtype``: the slots' dtype (default: the
    base weights' promoted to at least float32, as ``lora`` does).
    """

    def __init__(self, model: nn.Module, *, max_resident: int = 64, max_rank: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if applied(model) is not None or any(isinstance(m, AdapterLayer) for m in model.modules()):
            raise AdapterhubError("AdapterPool needs a plain model: this one already has adapter layers")
        if max_resident < 1:
            raise AdapterhubError(f"max_resident must be >= 1, got {max_resident}")
        if max_rank is not None and max_rank < 1:
            raise AdapterhubError(f"max_rank must be >= 1, got {max_rank}")
        first = next(iter(model.parameters()), None)
        self.model = model
        self.max_resident = int(max_resident)
        self.max_rank = max_rank
        self.device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))
        base_dtype = first.dtype if first is not None and first.dtype.is_floating_point else torch.float32
        self.dtype = dtype or torch.promote_types(base_dtype, torch.float32)
        self.fingerprint = model_fingerprint(model)
        self._adapters: dict[str, HostAdapter] = {}
        self._layers: dict[str, SLoraLayer] = {}
        self._resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._free: list[int] = []
        self._capacity = 0
        self._rank = int(max_rank) if max_rank is not None else 0
        self._state = SlotState()
        self._batch: list[str | None] | None = None
        self._last_rows: SlotRows | None = None  # reused by set_batch for the same slots (no page-in since)
        self._lock = threading.RLock()
        self.page_ins = 0
        self.evictions = 0

    # -- adding and removing --------------------------------------------------------------------
    def add(self, source: str | os.PathLike, name: str | None = None) -> str:
        """Load the LoRA adapter at ``source`` (store ref, bundle or PEFT directory, ``hf://``) into host memory.

        Returns its name: ``name``, else the ref as given, else the directory's name.
        """
        directory = bundle_dir(source)
        text = os.fspath(source)
        if name is None:
            name = directory.name if Path(text).expanduser().is_dir() else text
        with self._lock:
            if name in self._adapters:
                raise AdapterhubError(f"an adapter named '{name}' is already in the pool (remove it first, or pass "
                                      "another name)")
            modules = self._read(directory, text)
            adapter = HostAdapter(name, directory, modules)
            if self.max_rank is not None and adapter.rank > self.max_rank:
                raise AdapterhubError(f"adapter '{text}' has rank {adapter.rank} > the pool's max_rank {self.max_rank}")
            if self.device.type == "cuda":
                adapter.modules = {m: (a.pin_memory(), b.pin_memory(), s) for m, (a, b, s) in modules.items()}
            self._grow(rank=max(self._rank, adapter.rank))
            for module in modules:
                if module not in self._layers:
                    self._wrap(module)
            self._adapters[name] = adapter
        return name

    def remove(self, name: str) -> None:
        """Forget adapter ``name`` (its slot is freed). Refused while the current batch uses it."""
        with self._lock:
            self._known(name)
            if self._batch is not None and name in self._batch:
                raise AdapterhubError(f"adapter '{name}' is used by the current batch; clear_batch() first")
            slot = self._resident.pop(name, None)
            if slot is not None:
                for layer in self._layers.values():
                    layer.clear_slot(slot)
                self._free.append(slot)
                self._last_rows = None
            del self._adapters[name]

    def names(self) -> list[str]:
        return list(self._adapters)

    def __contains__(self, name: object) -> bool:
        return name in self._adapters

    def __len__(self) -> int:
        return len(self._adapters)

    # -- batches --------------------------------------------------------------------------------
    def set_batch(self, adapters: Sequence[str | None]) -> None:
        """Row ``b`` of the following forwards uses ``adapters[b]`` (None: the base model only)."""
        rows = list(adapters)
        with self._lock:
            for a in rows:
                if a is not None:
                    self._known(a)
            distinct = list(dict.fromkeys(a for a in rows if a is not None))
            if len(distinct) > self.max_resident:
                raise AdapterhubError(f"the batch uses {len(distinct)} different adapters but at most max_resident="
                                      f"{self.max_resident} can be on the device at once; split the batch")
            self._make_resident(distinct)
            slots = tuple(self._resident[a] if a is not None else -1 for a in rows)
            rank = max((self._adapters[a].rank for a in distinct), default=0)
            last = self._last_rows
            if last is None or last.host_slots != slots or last.rank_max != rank:
                last = self._last_rows = SlotRows(slots, rank, self.device)
            self._state.rows = last
            self._batch = rows

    @contextlib.contextmanager
    def batch(self, adapters: Sequence[str | None]) -> Iterator[AdapterPool]:
        """``set_batch(adapters)`` for the block, ``clear_batch()`` after it."""
        self.set_batch(adapters)
        try:
            yield self
        finally:
            self.clear_batch()

    def clear_batch(self) -> None:
        """Every row base-only."""
        with self._lock:
            self._state.rows = None
            self._batch = None

    def stats(self) -> dict[str, int]:
        """Counts and bytes: adapters, resident, slots, page_ins, evictions, host_bytes, device_bytes."""
        with self._lock:
            device_bytes = sum(t.numel() * t.element_size() for layer in self._layers.values()
                               for t in (layer.lora_A, layer.lora_B, layer.scaling, layer.rank))
            return {"adapters": len(self._adapters), "resident": len(self._resident), "slots": self._capacity,
                    "page_ins": self.page_ins, "evictions": self.evictions,
                    "host_bytes": sum(a.nbytes for a in self._adapters.values()), "device_bytes": device_bytes}

    def layers(self) -> dict[str, SLoraLayer]:
        """The wrapped modules by name."""
        return dict(self._layers)

    # -- internals ------------------------------------------------------------------------------
    def _known(self, name: str) -> None:
        if name not in self._adapters:
            close = difflib.get_close_matches(str(name), list(self._adapters), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise AdapterhubError(f"unknown adapter '{name}'{hint} (the pool has {len(self._adapters)}: "
                                  f"{', '.join(list(self._adapters)[:5])}{', ...' if len(self._adapters) > 5 else ''})")

    def _make_resident(self, wanted: list[str]) -> None:
        for a in wanted:
            if a in self._resident:
                self._resident.move_to_end(a)
        missing = [a for a in wanted if a not in self._resident]
        if not missing:
            return
        need = len(self._resident) + len(missing)
        if need > self._capacity and self._capacity < self.max_resident:
            self._grow(slots=min(self.max_resident, max(need, 2 * self._capacity)))
        keep = set(wanted)
        for a in missing:
            if self._free:
                slot = self._free.pop()
            else:
                victim = next(n for n in self._resident if n not in keep)
                slot = self._resident.pop(victim)
                self.evictions += 1
            self._page_in(a, slot)
            self._resident[a] = slot
        self._last_rows = None

    def _page_in(self, name: str, slot: int) -> None:
        adapter = self._adapters[name]
        for module, layer in self._layers.items():
            entry = adapter.modules.get(module)
            if entry is None:
                layer.clear_slot(slot)
            else:
                layer.write_slot(slot, entry[0], entry[1], entry[2])
        self.page_ins += 1

    def _grow(self, slots: int | None = None, rank: int | None = None) -> None:
        new_slots = slots if slots is not None else self._capacity
        new_rank = rank if rank is not None else self._rank
        if new_slots > self._capacity:
            self._free.extend(range(new_slots - 1, self._capacity - 1, -1))
        self._capacity, self._rank = max(new_slots, self._capacity), max(new_rank, self._rank)
        self._last_rows = None
        for layer in self._layers.values():
            layer.resize(self._capacity, self._rank)

    def _wrap(self, module: str) -> None:
        base = self.model.get_submodule(module)
        layer = SLoraLayer(base, slots=self._capacity, max_rank=self._rank, state=self._state, dtype=self.dtype)
        layer.to(self.device)
        replace_module(self.model, module, layer)
        self._layers[module] = layer

    def _target(self, module: str, source: str) -> tuple[int, int]:
        """``(in, out)`` of target ``module``, which must exist and be a Linear / Conv1D."""
        try:
            mod = self.model.get_submodule(module)
        except AttributeError:
            raise AdapterhubError(f"adapter '{source}' targets module '{module}', which this model lacks "
                                  "(was it made for another base model?)") from None
        if isinstance(mod, SLoraLayer):
            mod = mod.base_layer
        if module_kind(mod) not in ("linear", "conv1d"):
            raise AdapterhubError(f"adapter '{source}' adapts '{module}' ({type(mod).__name__}); the pool serves "
                                  "LoRA on Linear / Conv1D modules only")
        fin, fout = module_features(mod)
        return int(fin), int(fout)

    def _read(self, directory: Path, source: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """``{module: (A, B, scaling)}`` from an adapterhub bundle or a PEFT LoRA directory."""
        if not (directory / MANIFEST).is_file() and (directory / CONFIG).is_file():
            specs = self._peft_specs(directory, source)
        else:
            specs = self._bundle_specs(directory, source)
        weights = directory / WEIGHTS
        if not weights.is_file():
            extra = " (it holds adapter_model.bin, a pickle, which adapterhub never loads)" \
                if (directory / "adapter_model.bin").is_file() else ""
            raise AdapterhubError(f"adapter '{source}' has no {WEIGHTS}{extra}")
        features = {module: self._target(module, source) for module in specs}
        out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        try:
            with safe_open(str(weights), framework="pt", device="cpu") as f:
                keys = set(f.keys())
                for module, (r, scaling) in specs.items():
                    names = [f"{PREFIX}{module}.lora_{x}.weight" for x in "AB"]
                    missing = [k for k in names if k not in keys]
                    if missing:
                        raise AdapterhubError(f"adapter '{source}': {weights.name} lacks {missing[0]}")
                    a, b = (f.get_tensor(k).to(self.dtype).contiguous() for k in names)
                    fin, fout = features[module]
                    if tuple(a.shape) != (r, fin) or tuple(b.shape) != (fout, r):
                        raise AdapterhubError(f"adapter '{source}': {module} ({fin} -> {fout}, r={r}) has lora_A "
                                              f"{tuple(a.shape)} and lora_B {tuple(b.shape)}")
                    out[module] = (a, b, scaling)
        except AdapterhubError:
            raise
        except Exception as exc:
            raise AdapterhubError(f"cannot read {weights}: {exc}") from None
        if not out:
            raise AdapterhubError(f"adapter '{source}' adapts no module")
        return out

    def _bundle_specs(self, directory: Path, source: str) -> dict[str, tuple[int, float]]:
        m = read_manifest(directory)
        fp = m.get("base_fingerprint")
        if fp and fp != self.fingerprint:
            raise AdapterhubError(f"adapter '{source}' was made for another base model ({m.get('base_model')}, "
                                  f"{fp[:19]}...) than the pool's ({self.fingerprint[:19]}...)")
        specs: dict[str, tuple[int, float]] = {}
        for module, e in (m.get("modules") or {}).items():
            action, variant, params = e.get("action"), e.get("variant"), e.get("params") or {}
            if action == "train":
                raise AdapterhubError(f"adapter '{source}' fully trains '{module}' (a train rule); the pool serves "
                                      "LoRA adapters only")
            if action != "variant":
                continue
            if variant not in LORA_VARIANTS:
                raise AdapterhubError(f"adapter '{source}' uses {variant} on '{module}', which is not a plain LoRA; "
                                      f"convert it first: adapterhub export {source} --to peft --out DIR, then add DIR")
            r = int(params.get("r", 8))
            specs[module] = (r, lora_scaling(r, float(params.get("alpha", 8.0)), bool(params.get("rslora", False))))
        return specs

    def _peft_specs(self, directory: Path, source: str) -> dict[str, tuple[int, float]]:
        config = read_config(directory)
        assert config is not None
        if str(config.get("peft_type", "")).upper() != "LORA" or config.get("use_dora"):
            kind = "DoRA" if config.get("use_dora") else config.get("peft_type")
            raise AdapterhubError(f"adapter '{source}' is a PEFT {kind} adapter, not a plain LoRA; the pool "
                                  "serves LoRA only (adapterhub export SRC --to peft --out DIR makes one from a "
                                  "mergeable adapter)")
        resolution = resolve_peft(config, self.model)
        if resolution.train:
            raise AdapterhubError(f"adapter '{source}' has modules_to_save ({resolution.train[0]}, ...); the pool "
                                  "serves LoRA adapters only")
        return {module: (int(p["r"]), lora_scaling(int(p["r"]), float(p["alpha"]), bool(p.get("rslora", False))))
                for module, (_, p) in resolution.variants.items()}
