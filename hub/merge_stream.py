"""``adapterhub merge --model M ADAPTER --out DIR``: a full merged checkpoint, tensor by tensor.

The source checkpoint (``model.safetensors`` or ``model.safetensors.index.json`` + shards; a built-in
model is first saved to a temporary directory) is never loaded as a whole. The model is built on the
``meta`` device from its config (structure only), and the adapter's layers are rebuilt by their
variants' ``wrap`` around *placeholder* bases (zero-stride tensors of the right shape and dtype: no
memory), in ``apply``'s order so shared tensors (VeRA, Tied-LoRA) are owned as when they were saved,
and the bundle's tensors are loaded into them. Then, for each output shard (the same file names and
index as the source), the tensors are read **one at a time** (a ``safe_open`` per tensor, so no
mapping of the rest of the file stays resident), and written straight into a new safetensors file:

* the weight of an adapted module: its layer's base is swapped for a module holding just that
  module's tensors from the checkpoint, and ``merged = W0 + delta_weight()`` (in fp32, stored in the
  checkpoint's dtype); the bias gets ``delta_bias()`` the same way (a variant that changes the bias of
  a module without one -- GLoRA's E or W0 C on Llama -- is refused: transformers would drop it);
* the tensors of a ``train`` rule (modules_to_save): the bundle's;
* everything else: copied as read.

Each shard is written to a staging directory inside ``DIR``, fsynced, and renamed into place once
all are written; the index comes last (so ``DIR`` never holds a loadable half model). Peak memory
is a few tensors of the largest module (its weight, ``ΔW`` and the merged result in fp32), not the
model. config.json, generation_config.json and tokenizer files are copied.

**Quantized bases** (``lora(...) on nf4``, QLoRA): the merged model is the checkpoint's 16-bit
weight plus ``ΔW`` (``quant_base="original"``, the default). ``ΔW`` itself is computed as the
adapter computes it: on the dequantized weight for variants whose delta reads the base (DoRA, IA3,
GLoRA). ``quant_base="dequantized"`` merges into ``deq(Q(W0))`` instead -- exactly the function of
the adapted (quantized) model, at the cost of the quantization error -- and also writes frozen
``on QUANT`` modules dequantized. Variants that quantize jointly with their init (LoftQ, LQ-LoRA) always
merge into their own ``deq(Q)``: their ``B A`` was initialised to compensate ``W0 − deq(Q)``, so
``W0 + ΔW`` would count it twice (on GPT-2's Conv1D the result is stored back as ``in x out``). That
``Q`` is the one the bundle saved (``base_quant.safetensors``,
:mod:`adapterhub.plugins._saved_base`): the layer is built with its init skipped (as
``adapterhub.load`` builds it), the module's saved buffers -- read for that module alone -- are
copied into its quantized base, then the adapter's tensors; so the merge takes no quantize/SVD
iterations and stays exact even if the checkpoint's weights differ slightly from the ones trained
on. A bundle saved before bases were stored (or one merged with ``check_base=False`` into a base of
another structure) re-runs the init on the checkpoint's weights under the bundle's seed, which
reproduces ``Q`` only for bit-identical weights. To keep a quantized model, merge in memory with
:func:`adapterhub.merge_quantized` (``requantize=True``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from adapterhub.plugins._saved_base import SavedBaseFile, restore_base, restoring
from adapterhub.registry import AdapterhubError, AdapterLayer, ApplyContext, Registry, bind, get_registry

from .atomic import fsync_dir
from .rebuild import PREFIX, BundleInfo, Entry, bundle_entries, check_fingerprint, load_layer_tensors, quantize_module
from .shards import BY_NAME, INDEX, Checkpoint, file_metadata, fsync_file, write_safetensors

_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".index.json")


@dataclass
class MergedModule:
    """One module whose weight changed."""

    module: str
    variant: str
    key: str  # checkpoint tensor
    relative_change: float  # ‖ΔW‖_F / ‖W0‖_F
    bias: bool  # its bias changed too
    base: str  # original | dequantized (what ΔW was added to)


@dataclass
class StreamMergeReport:
    """What :func:`merge_checkpoint` wrote."""

    out: str
    model: str
    adapter: str
    files: list[str]
    tensors: int
    bytes: int
    largest_tensor_bytes: int
    modules: list[MergedModule]
    replaced: list[str]  # tensors of train rules, taken from the bundle
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {**{k: v for k, v in asdict(self).items() if k != "modules"},
                "modules": [asdict(m) for m in self.modules]}


# --------------------------------------------------------------------------- the merge


def _placeholder(meta_module: nn.Module, dtypes: dict[str, torch.dtype]) -> nn.Module:
    """``meta_module`` with zero-stride CPU tensors of the right shapes and dtypes (no memory)."""
    mod = copy.deepcopy(meta_module)
    for name, p in list(mod.named_parameters(recurse=False)):
        t = torch.zeros((), dtype=dtypes.get(name, p.dtype)).expand(p.shape)
        mod._parameters[name] = nn.Parameter(t, requires_grad=False)
    for name, b in list(mod.named_buffers(recurse=False)):
        mod._buffers[name] = torch.zeros((), dtype=dtypes.get(name, b.dtype)).expand(b.shape)
    return mod


class _Merger:
    def __init__(self, ckpt: Checkpoint, meta: nn.Module, info: BundleInfo, registry: Registry, quant_base: str,
                 saved_bases: bool = True):
        self.ckpt, self.meta, self.info, self.registry, self.quant_base = ckpt, meta, info, registry, quant_base
        self.prefix = getattr(meta, "base_model_prefix", "") or ""
        self.entries = {e.module: e for e in info.entries}
        self.keys: dict[str, dict[str, str]] = {}  # module -> {param name: checkpoint key}
        self.owner: dict[str, tuple[str, str]] = {}  # checkpoint key -> (module, param name)
        self.pending: dict[str, torch.Tensor] = {}
        self.reports: list[MergedModule] = []
        self.replaced: list[str] = []
        self.written: set[str] = set()
        self._check()
        self.bases = self._saved_bases() if saved_bases else None
        self.restored: list[str] = []  # modules merged into their saved deq(Q)
        self.layers = self._skeleton()

    def _saved_bases(self) -> SavedBaseFile | None:
        """The bundle's saved quantized bases (header only), or None for a bundle without them."""
        m = self.info.manifest
        if not m or not m.get("base_quant"):
            return None
        bases = SavedBaseFile(self.info.directory, m["base_quant"], set(m["modules"]))
        stray = sorted(n for n in bases.modules if n not in self.entries or not self._owns(self.entries[n]))
        if stray:
            raise AdapterhubError(f"bundle '{self.info.source}': module '{stray[0]}' has a saved quantized base, but "
                                  "its adapter does not quantize its own base (LoftQ, LQ-LoRA)")
        return bases

    def _check(self) -> None:
        tied: dict[int, list[str]] = {}
        for name, p in self.meta.named_parameters(remove_duplicate=False):
            tied.setdefault(id(p), []).append(name)
        for m, e in self.entries.items():
            if e.action == "variant":
                v = self.registry.variants.get(e.variant or "")
                if v is None or not v.mergeable or v.attach:
                    raise AdapterhubError(f"cannot merge '{self.info.source}': {e.variant} adapters (module '{m}') "
                                          "have no weight-space form")
            elif not (e.action == "train" or (e.action == "freeze" and e.quant and self.quant_base == "dequantized")):
                continue
            mod = self.meta.get_submodule(m)
            names = {}
            for pname, p in mod.named_parameters(recurse=False):
                key = self.ckpt.key_for(f"{m}.{pname}", self.prefix)
                others = [n for n in tied[id(p)] if n != f"{m}.{pname}"]
                if others:
                    raise AdapterhubError(f"cannot merge into '{m}': its {pname} is tied to "
                                          f"'{others[0].rpartition('.')[0]}' (tied embeddings), so merging would "
                                          "change both modules")
                if key is None:
                    raise AdapterhubError(f"the checkpoint has no tensor for '{m}.{pname}' "
                                          f"(looked in {self.ckpt.path})")
                names[pname] = key
                self.owner[key] = (m, pname)
            self.keys[m] = names

    def _dtypes(self, module: str) -> dict[str, torch.dtype]:
        out = {}
        for pname, key in self.keys[module].items():
            dt = self.ckpt.headers[self.ckpt.weight_map[key]][key]["dtype"]
            out[pname] = BY_NAME.get(dt, torch.float32)
        return out

    def _owns(self, e: Entry) -> bool:
        return bool(e.action == "variant" and e.quant and self.registry.variants[e.variant].owns_quantization)

    def _skeleton(self) -> dict[str, AdapterLayer]:
        from .rebuild import wrap_entries

        plain = [e for e in self.info.entries if e.action == "variant" and not self._owns(e)]
        self.placeholders = {e.module: _placeholder(self.meta.get_submodule(e.module), self._dtypes(e.module))
                             for e in plain}

        def quantized(e: Entry) -> nn.Module:  # variants that insist on a quantized base (QA-LoRA)
            return quantize_module(_materialized(self.placeholders[e.module]), e, self.registry)

        layers = wrap_entries(self.placeholders, plain, self.info.seed, self.registry, retry_base=quantized)
        for name, layer in layers.items():
            layer.base_layer = self.placeholders[name]
        ignore = [e.module for e in self.info.entries if e.action != "variant" or self._owns(e)]
        load_layer_tensors(layers, self.info.directory, self.info.source, ignore_modules=ignore)
        return layers

    def _real(self, module: str) -> nn.Module:
        """The module holding its checkpoint tensors (read now)."""
        mod = copy.deepcopy(self.meta.get_submodule(module))
        for pname, key in self.keys[module].items():
            mod._parameters[pname] = nn.Parameter(self.ckpt.read(key), requires_grad=False)
        return mod

    def produce(self, key: str) -> torch.Tensor:
        if key in self.pending:
            return self.pending.pop(key)
        if key not in self.owner:
            return self.ckpt.read(key)
        module, pname = self.owner[key]
        e = self.entries[module]
        if e.action == "train":
            return self._train_tensor(module, pname, key)
        if e.action == "freeze":
            real = self._real(module)
            q = quantize_module(real, e, self.registry)
            w = q.dequantize()
            self._stash(module, key, {"weight": (w.t() if _is_conv1d(real) else w).to(real.weight.dtype),
                                      **({"bias": real.bias} if getattr(real, "bias", None) is not None else {})})
            return self.pending.pop(key)
        self._stash(module, key, self._merge_module(module, e))
        return self.pending.pop(key)

    def _stash(self, module: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
        for pname, t in tensors.items():
            k = self.keys[module].get(pname)
            if k is not None and (k == key or k not in self.written):
                self.pending[k] = t

    def _train_tensor(self, module: str, pname: str, key: str) -> torch.Tensor:
        from safetensors import safe_open

        from .bundle import WEIGHTS

        with safe_open(str(self.info.directory / WEIGHTS), framework="pt") as f:
            name = f"{PREFIX}{module}.{pname}"
            if name not in f.keys():
                raise AdapterhubError(f"bundle '{self.info.source}' has no tensor {name} for its train rule")
            t = f.get_tensor(name)
        like = self.ckpt.headers[self.ckpt.weight_map[key]][key]
        self.replaced.append(key)
        return t.to(BY_NAME.get(like["dtype"], t.dtype))

    def _merge_module(self, module: str, e: Entry) -> dict[str, torch.Tensor]:
        real = self._real(module)
        variant = self.registry.variants[e.variant]
        with torch.no_grad():
            if self._owns(e):
                q = self.registry.quantizers[e.quant]
                saved = self.bases.read(module) if self.bases is not None and module in self.bases.modules else None
                skip_init = frozenset({module}) if saved is not None else frozenset()
                with torch.random.fork_rng(devices=[]), restoring(skip_init, {module: e.quant_params}):
                    torch.manual_seed(self.info.seed)
                    layer = variant.wrap_quantized(real, bind(variant.Params, e.params, owner=variant.name), q,
                                                   bind(q.Params, e.quant_params, owner=q.name),
                                                   ApplyContext(seed=self.info.seed), module)
                if saved is not None:  # Q as trained: the bundle's buffers replace the plain quantization
                    restore_base(layer.base_layer, saved, f"bundle '{self.info.source}', module '{module}'")
                    self.restored.append(module)
                    del saved
                others = [m for m in self.entries if m != module]
                load_layer_tensors({module: layer}, self.info.directory, self.info.source, ignore_modules=others)
                base, label = layer.to_base_layout(layer.base_weight()), "dequantized"
            else:
                layer = self.layers[module]
                dequant = self.quant_base == "dequantized" and e.quant
                use = quantize_module(real, e, self.registry) if (
                    e.quant and (type(layer).delta_reads_base or dequant)) else real
                layer.base_layer = use
                base = layer.to_base_layout(layer.base_weight()) if dequant else real.weight
                label = "dequantized" if dequant else "original"
            try:
                delta = layer.delta_weight().detach().float()
                if delta.data_ptr() in {p.data_ptr() for p in layer.parameters()}:
                    delta = delta.clone()  # never add into a tensor the layer holds
                dbias = layer.delta_bias()
            finally:
                if module in self.placeholders:
                    layer.base_layer = self.placeholders[module]
            w0 = real.weight
            w_norm = torch.linalg.vector_norm(w0, dtype=torch.float32).item()
            change = torch.linalg.vector_norm(delta).item() / w_norm if w_norm else 0.0
            delta.add_(base)  # in place: W0 + ΔW in fp32 without another full-size temporary
            if self._owns(e) and _is_conv1d(real):  # the owned base is a Linear (out x in); Conv1D stores in x out
                delta = delta.t()
            out = {"weight": delta.to(w0.dtype)}
            del delta, base
            b0 = getattr(real, "bias", None)
            if b0 is not None:
                out["bias"] = b0
            if dbias is not None:
                if b0 is None:
                    raise AdapterhubError(f"cannot merge '{self.info.source}': {e.variant} changes the bias of module "
                                          f"'{module}', which has none in this architecture (transformers would drop "
                                          "an added bias); use adapterhub.merge_and_unload in memory instead")
                out["bias"] = (b0.float() + dbias.detach().float().reshape(b0.shape)).to(b0.dtype)
            self.reports.append(MergedModule(module, e.variant or "", self.keys[module]["weight"], change,
                                             dbias is not None, label))
        return out


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def _materialized(placeholder: nn.Module) -> nn.Module:
    mod = copy.deepcopy(placeholder)
    for name, p in list(mod.named_parameters(recurse=False)):
        mod._parameters[name] = nn.Parameter(p.detach().contiguous(), requires_grad=False)
    return mod


def _aux_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(_SKIP_SUFFIXES))


def merge_checkpoint(model: str, adapter: str | os.PathLike, out: str | os.PathLike, *, check_base: bool = True,
                     quant_base: Literal["original", "dequantized"] = "original", overwrite: bool = False,
                     progress: bool = False, registry: Registry | None = None) -> StreamMergeReport:
    """Merge ``adapter`` into the checkpoint of ``model`` and write the full model to ``out``
    (see the module docstring). ``model``: a built-in name, a checkpoint directory or a cached Hub id."""
    from .fingerprint import model_fingerprint
    from .models import _transformers, meta_model_from_config, resolve_source

    if quant_base not in ("original", "dequantized"):
        raise AdapterhubError(f"quant_base must be 'original' or 'dequantized', got {quant_base!r}")
    registry = registry or get_registry()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AdapterhubError(f"--out '{out}' is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AdapterhubError(f"--out '{out}' is not empty; pass --overwrite to replace the model in it")
    _refuse_classifier(adapter)
    src = resolve_source(model)
    with tempfile.TemporaryDirectory(prefix="adapterhub-merge-src-") as tmp:
        if src.kind == "builtin":
            from transformers.utils import logging as tf_logging

            from .models import build_builtin

            shown = tf_logging.is_progress_bar_enabled()
            tf_logging.disable_progress_bar()
            try:
                build_builtin(src.name).save_pretrained(tmp)
            finally:
                if shown:
                    tf_logging.enable_progress_bar()
            path = Path(tmp)
        else:
            assert src.path is not None
            path = src.path
        ckpt = Checkpoint(path)
        config = _transformers().AutoConfig.from_pretrained(path)
        meta = meta_model_from_config(config)
        info = bundle_entries(adapter, meta)
        fingerprint = model_fingerprint(meta)
        if check_base:
            check_fingerprint(info, meta, fingerprint)
        merger = _Merger(ckpt, meta, info, registry, quant_base, saved_bases=_same_base(info, fingerprint))
        return _write(ckpt, merger, out, str(model), str(adapter), progress)


def _same_base(info: BundleInfo, fingerprint: str) -> bool:
    """Whether the model (its ``fingerprint``) is the bundle's base, so its saved quantized bases fit
    (as ``load`` decides: with ``check_base=False`` and another base, the jointly-quantizing inits re-run)."""
    want = (info.manifest or {}).get("base_fingerprint")
    return not want or fingerprint == want


def _write(ckpt: Checkpoint, merger: _Merger, out: Path, model: str, adapter: str, progress: bool) -> StreamMergeReport:
    from .report import make_console

    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".adapterhub-merge-", dir=out))
    total = sum(m["data_offsets"][1] - m["data_offsets"][0] for h in ckpt.headers.values() for m in h.values())
    count, largest = 0, 0
    try:
        bar = None
        if progress:
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("merging {task.description}"), BarColumn(), DownloadColumn(),
                           TimeRemainingColumn(), console=make_console(stderr=True), transient=True)
            bar.start()
            task = bar.add_task("", total=total)
        try:
            for file in ckpt.files:
                keys = ckpt.keys_of(file)
                if bar is not None:
                    bar.update(task, description=file)

                def produce(key: str) -> torch.Tensor:
                    t = merger.produce(key)
                    merger.written.add(key)
                    return t

                metadata = file_metadata(ckpt.path / file)
                largest = max(largest, write_safetensors(stage / file, ckpt.headers[file], keys, produce, metadata,
                                                         (lambda n: bar.advance(task, n)) if bar else (lambda n: None)))
                count += len(keys)
        finally:
            if bar is not None:
                bar.stop()
        for f in _aux_files(ckpt.path):
            shutil.copyfile(f, stage / f.name)
        if ckpt.index is not None:
            (stage / INDEX).write_text(json.dumps(ckpt.index, indent=2, sort_keys=True) + "\n")
        names = [f.name for f in _aux_files(stage)] + list(ckpt.files)
        for name in names:
            fsync_file(stage / name)
            os.replace(stage / name, out / name)
        for old in out.iterdir():  # weight files of an earlier model (--overwrite) would confuse loaders
            if old.is_file() and old.name.endswith((".safetensors", ".safetensors.index.json")) and \
                    old.name not in names:
                old.unlink()
        fsync_dir(out)  # every shard is in place and durable before the index appears
        if ckpt.index is not None:
            fsync_file(stage / INDEX)
            os.replace(stage / INDEX, out / INDEX)
            names.append(INDEX)
            fsync_dir(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    notes = _notes(merger)
    return StreamMergeReport(str(out), model, adapter, names, count, total, largest, merger.reports, merger.replaced,
                             notes)


def _notes(merger: _Merger) -> list[str]:
    notes = []
    if merger.info.manifest is None:
        notes.append("the adapter was saved by PEFT: it carries no base-model fingerprint, so the base could not "
                     "be checked")
    quants = sorted({e.quant for e in merger.info.entries if e.quant and not merger._owns(e)})
    if quants:
        if merger.quant_base == "original":
            notes.append(f"the adapter sits on a base quantized with {', '.join(quants)}: ΔW was added to the "
                         "checkpoint's full-precision weights (use --quant-base dequantized for the adapted model's "
                         "exact function)")
        else:
            notes.append(f"the adapter sits on a base quantized with {', '.join(quants)}: ΔW was added to the "
                         "dequantized weights (the adapted model's exact function)")
    owns = sorted({e.variant for e in merger.info.entries if merger._owns(e)})
    if owns:
        rerun = sorted(r.module for r in merger.reports if r.module not in merger.restored
                       and merger._owns(merger.entries[r.module]))
        how = "the deq(Q) saved in the bundle" if not rerun else (
            f"their own deq(Q); {len(rerun)} module(s) had no saved base to use (an older bundle, or a model "
            "of another structure), so their init was re-run on the checkpoint's weights, which reproduces Q only "
            "if those are the weights trained on")
        notes.append(f"{', '.join(owns)} quantize jointly with their init: merged into {how}")
    return notes


def _refuse_classifier(adapter: str | os.PathLike) -> None:
    """A classification bundle's head is not in the base checkpoint: say how to merge it instead."""
    from .bundle import MANIFEST, read_manifest
    from .sources import bundle_dir

    directory = bundle_dir(adapter)
    task = read_manifest(directory).get("task") if (directory / MANIFEST).is_file() else None
    if task:
        n = task.get("num_labels") if isinstance(task, dict) else "?"
        raise AdapterhubError(
            f"bundle '{adapter}' is a sequence classifier ({n} labels): the streaming merge writes the base "
            "model's checkpoint, which has no head for them. Merge it in memory instead: model = "
            "adapterhub.load_classifier(MODEL, BUNDLE); adapterhub.merge_and_unload(model); "
            "model.save_pretrained(DIR)")
