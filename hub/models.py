"""Where models come from, and what planning needs to know of them.

``--model`` accepts a built-in small model name (``tiny-llama``, ``tiny-gpt2``, ``tiny-bert``:
built from a config with a fixed seed), a local Hugging Face-format directory (config.json +
safetensors), or a Hub id found in the local Hugging Face cache.

Planning never loads weights: a checkpoint directory is built on the ``meta`` device from its
config (or, for architectures transformers does not know, described from the safetensors headers).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapterhub.registry import AdapterhubError, AdapterLayer, ModuleInfo, QuantizedLinear, module_features
from adapterhub.registry import module_kind as _kind

BYTE_VOCAB = 260  # 256 byte values + bos, eos, pad, unk: the built-in models' byte-level tokenizer

BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       vocab_size=BYTE_VOCAB, tie_word_embeddings=False),
    "tiny-gpt2": dict(family="gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=512, vocab_size=BYTE_VOCAB),
    "tiny-bert": dict(family="bert", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, max_position_embeddings=512, vocab_size=BYTE_VOCAB, num_labels=2),
}


def _transformers():
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise AdapterhubError("this needs transformers: pip install 'adapterhub[hf]'") from exc
    transformers.logging.set_verbosity_error()
    return transformers


def builtin_config(name: str):
    """The transformers config of a built-in model."""
    tf = _transformers()
    spec = dict(BUILTIN_MODELS[name])
    family = spec.pop("family")
    cls = {"llama": tf.LlamaConfig, "gpt2": tf.GPT2Config, "bert": tf.BertConfig}[family]
    cfg = cls(**spec)
    cfg.architectures = [{"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel",
                          "bert": "BertForSequenceClassification"}[family]]
    cfg.name_or_path = name
    return cfg


def build_builtin(name: str, seed: int = 0) -> nn.Module:
    """A built-in small model with random weights from ``seed`` (the same weights every time)."""
    if name not in BUILTIN_MODELS:
        raise AdapterhubError(f"unknown built-in model '{name}' (built-ins: {', '.join(BUILTIN_MODELS)})")
    cfg = builtin_config(name)
    cls = getattr(_transformers(), cfg.architectures[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(cfg)
    model.eval()
    return model


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--model`` argument: ``kind`` is builtin, dir or hub; ``path`` for dir/hub."""

    kind: str
    name: str
    path: Path | None = None


def resolve_source(model: str, *, need_weights: bool = True) -> ModelSource:
    """Turn a ``--model`` string into a source, fetching only from the local HF cache."""
    if model in BUILTIN_MODELS:
        return ModelSource("builtin", model)
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file() and not list(p.glob("*.safetensors")):
            raise AdapterhubError(f"model directory '{p}' has neither config.json nor *.safetensors files")
        return ModelSource("dir", model, p)
    if p.exists():
        raise AdapterhubError(f"--model '{model}' is a file; give a model directory (config.json + safetensors)")
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return ModelSource("hub", model, _from_hf_cache(model, need_weights))
    raise AdapterhubError(
        f"--model '{model}' is not a built-in model ({', '.join(BUILTIN_MODELS)}), "
        "not a local directory, and not a Hub id (org/name)")


def _from_hf_cache(repo_id: str, need_weights: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt"] if need_weights else ["config.json",
                                                                                    "*.safetensors.index.json"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
        raise AdapterhubError(
            f"model '{repo_id}' is not in the local Hugging Face cache ({cache}) and the Hub could not "
            f"be reached ({reason[:200]}). Download it where the Hub is reachable, or pass a local "
            "directory.") from None


def load_model(model: str | ModelSource, seed: int = 0) -> nn.Module:
    """A live model with weights, from a built-in name, a local directory or the HF cache."""
    src = model if isinstance(model, ModelSource) else resolve_source(model)
    if src.kind == "builtin":
        return build_builtin(src.name, seed)
    tf = _transformers()
    assert src.path is not None
    cfg = tf.AutoConfig.from_pretrained(src.path)
    archs = getattr(cfg, "architectures", None) or []
    cls = getattr(tf, archs[0], None) if archs else None
    try:
        if cls is None:
            cls = tf.AutoModelForCausalLM
        model_obj = cls.from_pretrained(src.path)
    except Exception as exc:
        raise AdapterhubError(f"could not load model from '{src.path}': {exc}") from None
    model_obj.eval()
    return model_obj


# --------------------------------------------------------------------------- module infos


def _param_bytes(params: Iterable[torch.Tensor], dtype: torch.dtype | None = None) -> int:
    size = dtype.itemsize if dtype is not None else None
    return sum(p.numel() * (size or p.element_size()) for p in params)


def module_infos(model: nn.Module, dtype: torch.dtype | None = None) -> list[ModuleInfo]:
    """Describe every module of a live (or meta) model, in ``named_modules`` order.

    Adapter layers and quantized layers are leaves. A parameter shared by several modules
    (tied embeddings) is counted for the first module only. ``dtype`` overrides the stored
    dtype for byte counts (a meta model built from a config that says bfloat16).
    """
    seen: set[int] = set()
    infos: list[ModuleInfo] = []
    dims: dict[str, Any] = dict(attention_dims(getattr(model, "config", None)))
    causal = is_causal_lm(model)
    if causal is not None:
        dims["causal"] = causal
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, mod = stack.pop()
        mine = list(mod.parameters(recurse=isinstance(mod, (AdapterLayer, QuantizedLinear))))
        own = [p for p in mine if id(p) not in seen]
        tied = sum(p.numel() for p in mine if id(p) in seen)
        seen.update(id(p) for p in own)
        is_leaf = isinstance(mod, (AdapterLayer, QuantizedLinear)) or not any(True for _ in mod.children())
        kind = "adapter" if isinstance(mod, AdapterLayer) else _kind(mod)
        fin, fout = module_features(mod.base_layer if isinstance(mod, AdapterLayer) else mod)
        wbytes = mod.weight_bytes() if isinstance(mod, QuantizedLinear) else _param_bytes(own, dtype)
        weight = getattr(mod, "weight", None)
        wdtype = dtype or (weight.dtype if isinstance(weight, torch.Tensor) else None)
        infos.append(ModuleInfo(
            name=name, type_name=type(mod).__name__, kind=kind, in_features=fin, out_features=fout,
            own_params=sum(p.numel() for p in own), weight_bytes=wbytes,
            dtype=str(wdtype).removeprefix("torch.") if wdtype is not None else None, is_leaf=is_leaf,
            quantized=getattr(mod, "quantizer", None) if isinstance(mod, QuantizedLinear) else None,
            tied_params=tied, extra=_container_extra(kind, mod, dims)))
        if not is_leaf:
            children = list(mod.named_children())
            for child_name, child in reversed(children):
                stack.append((f"{name}.{child_name}" if name else child_name, child))
    return infos


def attention_dims(cfg: Any) -> dict[str, int]:
    """``hidden_size``, ``num_heads``, ``num_kv_heads``, ``head_dim`` of a transformers config."""
    if cfg is None:
        return {}
    get = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(get, "hidden_size", None) or getattr(get, "n_embd", None)
    heads = getattr(get, "num_attention_heads", None) or getattr(get, "n_head", None)
    if not hidden or not heads:
        return {}
    kv = getattr(get, "num_key_value_heads", None) or heads
    head_dim = getattr(get, "head_dim", None) or hidden // heads
    dims = {"hidden_size": hidden, "num_heads": heads, "num_kv_heads": kv, "head_dim": head_dim}
    if getattr(get, "vocab_size", None):
        dims["vocab_size"] = get.vocab_size
    return dims


def is_causal_lm(model: nn.Module) -> bool | None:
    """Whether ``model`` is a decoder-only (causal) language model; None when unknown."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")) or getattr(cfg, "is_decoder", False):
        return True
    archs = getattr(cfg, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return True
    return False


def _container_extra(kind: str, mod: nn.Module, dims: dict[str, Any]) -> dict[str, Any]:
    if kind == "blocks":
        return {"num_blocks": len(mod), **dims}
    if kind in ("attention", "embedding"):
        return dict(dims)
    return {}


def _config_dtype(cfg: Any) -> torch.dtype:
    d = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None) or "float32"
    if isinstance(d, torch.dtype):
        return d
    return getattr(torch, str(d).removeprefix("torch."), torch.float32)


def meta_model_from_config(cfg: Any) -> nn.Module:
    """The model of a transformers config built on the meta device (no memory for weights)."""
    tf = _transformers()
    archs = getattr(cfg, "architectures", None) or []
    cls = getattr(tf, archs[0], None) if archs else None
    with torch.device("meta"):
        if cls is not None:
            return cls(cfg)
        return tf.AutoModelForCausalLM.from_config(cfg)


def checkpoint_infos(path: str | Path) -> tuple[list[ModuleInfo], str]:
    """Module infos of a checkpoint directory without loading any weight.

    Known architectures are built on the meta device from config.json; otherwise the safetensors
    headers give the tensors (2-D ``*.weight`` become Linear-like leaves). Returns ``(infos, name)``.
    """
    path = Path(path)
    name = path.name
    if (path / "config.json").is_file():
        tf = _transformers()
        try:
            cfg = tf.AutoConfig.from_pretrained(path)
        except Exception as exc:
            cfg = None
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        else:
            name = getattr(cfg, "_name_or_path", "") or name
            try:
                model = meta_model_from_config(cfg)
            except Exception as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            else:
                return module_infos(model, dtype=_config_dtype(cfg)), str(name)
        if not list(path.glob("*.safetensors")):
            raise AdapterhubError(f"cannot read the model in '{path}': {reason}")
    return safetensors_infos(path), str(name)


def read_safetensors_header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes); reads no tensor data."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise AdapterhubError(f"'{file}' is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise AdapterhubError(f"'{file}' is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise AdapterhubError(f"'{file}' has a corrupt safetensors header: {exc}") from None
    header.pop("__metadata__", None)
    return header


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_infos(path: Path) -> list[ModuleInfo]:
    """Leaves described from safetensors headers: one module per ``<module>.weight`` tensor."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise AdapterhubError(f"no *.safetensors files in '{path}'")
    modules: dict[str, dict[str, Any]] = {}
    for file in files:
        for key, meta in read_safetensors_header(file).items():
            mod, _, pname = key.rpartition(".")
            shape, dt = meta.get("shape", []), meta.get("dtype", "F32")
            entry = modules.setdefault(mod, {"params": 0, "bytes": 0, "weight": None, "dtype": dt})
            numel = 1
            for s in shape:
                numel *= s
            entry["params"] += numel
            entry["bytes"] += numel * _DTYPE_BYTES.get(dt, 4)
            if pname == "weight":
                entry["weight"] = shape
                entry["dtype"] = dt
    infos = []
    for mod, e in modules.items():
        shape = e["weight"]
        kind, fin, fout = "other", None, None
        if shape is not None and len(shape) == 2:
            last = mod.rsplit(".", 1)[-1]
            if "embed" in last or last in ("wte", "wpe"):
                kind, fin, fout = "embedding", shape[0], shape[1]
            else:
                kind, fin, fout = "linear", shape[1], shape[0]
        infos.append(ModuleInfo(mod, "Linear" if kind == "linear" else ("Embedding" if kind == "embedding"
                                else "Module"), kind, fin, fout, e["params"], e["bytes"],
                                {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(e["dtype"], e["dtype"]),
                                True))
    containers = sorted({m.rsplit(".", k)[0] for m in modules for k in range(1, m.count(".") + 1)} - set(modules))
    infos += [ModuleInfo(c, "Module", "other", None, None, 0, 0, None, False) for c in containers]
    return infos


def module_weight_loader(model: nn.Module):
    """``load(name) -> out x in weight`` of a live model's module (dequantized, Conv1D transposed)."""
    def load(name: str) -> torch.Tensor:
        mod = model.get_submodule(name)
        if isinstance(mod, AdapterLayer):
            return mod.base_weight().detach()
        if isinstance(mod, QuantizedLinear):
            return mod.dequantize()
        w = mod.weight.detach()
        if w.is_meta:
            raise AdapterhubError(f"module '{name}' has no weights (meta device)")
        return w.t() if _kind(mod) in ("conv1d", "embedding") else w
    return load


def safetensors_weight_loader(path: str | Path, transposed: frozenset[str] = frozenset()):
    """``load(name) -> out x in weight`` read from a checkpoint's safetensors (one tensor at a time);
    modules named in ``transposed`` store ``in x out`` (GPT-2's Conv1D) and are transposed."""
    files = sorted(Path(path).glob("*.safetensors"))

    def load(name: str) -> torch.Tensor:
        from safetensors import safe_open

        key = f"{name}.weight"
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                if key in f.keys():
                    t = f.get_tensor(key)
                    return t.t() if name in transposed else t
        raise AdapterhubError(f"no tensor '{key}' in the safetensors files of '{path}' (the weights are needed "
                              "to choose per-matrix quantization)")
    return load
