"""Training on a k-bit base -- QLoRA in full (Dettmers et al., 2023, arXiv 2305.14314).

QLoRA = ``lora(...) on nf4``: NF4 base weights with double quantization (blocks of 64, the
block scales quantized to 8 bits in blocks of 256), the base matmul in bf16, adapters in fp32,
paged 8-bit AdamW and the "prepare for k-bit training" steps. In adapterhub:

* **bf16 compute**: ``on nf4(compute_dtype=bfloat16)``. The quantized layer dequantizes its weight
  to bf16, casts the input to bf16, runs the matmul in bf16 and returns the input's dtype; the LoRA
  branch stays fp32 (its ``A``/``B`` are fp32 and it casts ``x`` to fp32), so with fp32 hidden
  states only the frozen base matmul runs in bf16 and the adapter's gradients are fp32.
* **memory actually used**: :func:`quant_memory` measures the bytes the quantized layers hold
  (codes + block scales + nested scales + code tables), per quantizer. NF4 + DQ at blocksize 64 is
  ``4 + 8/64 + 32/(64*256) = 4.127`` bits per weight by formula (what ``plan`` shows); each layer
  also keeps its 16-entry NF4 table and 256-entry nested table (1,092 bytes), so a 1024 x 1024
  layer measures 4.135 bits and a 4096 x 4096 one 4.1275.
* **optimizers**: :func:`adapterhub.optim.make_optimizer` (``adamw_8bit``, ``paged_adamw_8bit``, ...).
* **prepare for k-bit training**: :func:`prepare_kbit_training`, PEFT's
  ``prepare_model_for_kbit_training`` (peft/utils/other.py): freeze the base, cast every 16-bit
  floating parameter that is not quantized (norms, embeddings, the head, biases) to fp32 -- all of
  them, not only norms, because an fp32 norm feeding a bf16 ``nn.Linear`` would be a dtype mismatch --
  make the input embeddings' output require grad, and turn on gradient checkpointing
  (transformers >= 5 ``activation_checkpointing_enable`` also hooks the input embeddings of
  ``input_ids`` models; the explicit hook covers other models and older versions).

Call it before or after ``apply``: before, it freezes everything (``apply`` then marks the adapters
trainable); after, it keeps exactly the adapter tensors and ``train`` modules trainable. Quantized
buffers are never touched. Unlike PEFT, the upcast and the input-gradient hook do not depend on the
model having been *loaded* in k-bit (``is_loaded_in_4bit``): adapterhub quantizes after loading.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapterhub.registry import AdapterhubError, QuantizedLinear

from .surgery import adapter_layers, applied

_HALF = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- measured memory


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    """Identity of a tensor's memory (views sharing data count once); meta tensors by object."""
    if t.device.type == "meta":
        return ("meta", id(t))
    return (str(t.device), t.data_ptr(), t.numel(), t.dtype)


def _tensor_bytes(tensors: Any) -> int:
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for t in tensors:
        key = _key(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def quant_memory(model: nn.Module) -> dict[str, Any]:
    """The weight memory ``model`` uses now, measured from its tensors.

    Returns ``{"quantizers": {name: {"layers", "params", "bytes", "bits_per_param"}},
    "quantized_bytes", "dense_bytes", "weight_bytes", "adapter_bytes", "total_bytes"}``:
    ``params`` counts the quantized weights (``in * out`` per layer, biases excluded), ``bytes`` is
    :meth:`QuantizedLinear.weight_bytes` (codes + all scale levels + code tables); ``dense_bytes``
    is every parameter outside the adapters (norms, embeddings, unquantized linears, biases);
    ``weight_bytes = quantized_bytes + dense_bytes`` is the base model now (compare with ``plan``'s
    ``weight_bytes_after``) and ``total_bytes`` adds the adapter tensors.
    """
    per: dict[str, dict[str, Any]] = {}
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            row = per.setdefault(mod.quantizer or type(mod).__name__, {"layers": 0, "params": 0, "bytes": 0})
            row["layers"] += 1
            row["params"] += mod.in_features * mod.out_features
            row["bytes"] += mod.weight_bytes()
    for row in per.values():
        row["bits_per_param"] = round(8 * row["bytes"] / row["params"], 6) if row["params"] else 0.0
    adapter_tensors = [t for _, layer in adapter_layers(model) for t in layer.adapter_state_dict().values()]
    adapter_keys = {_key(t) for t in adapter_tensors}
    dense = [p for p in model.parameters() if _key(p) not in adapter_keys]
    quantized = sum(r["bytes"] for r in per.values())
    dense_bytes = _tensor_bytes(dense)
    adapter_bytes = _tensor_bytes(adapter_tensors)
    return {"quantizers": per, "quantized_bytes": quantized, "dense_bytes": dense_bytes,
            "weight_bytes": quantized + dense_bytes, "adapter_bytes": adapter_bytes,
            "total_bytes": quantized + dense_bytes + adapter_bytes}


def format_quant_memory(mem: dict[str, Any], planned_bytes: int | None = None) -> str:
    """One line for people: ``measured: 1.23 MiB weights; nf4: 4.135 bits/param over 28 layers``."""
    from .report import human_bytes

    text = f"measured: {human_bytes(mem['weight_bytes'])} weights"
    if planned_bytes:
        text += f" (plan: {human_bytes(planned_bytes)}, {100 * (mem['weight_bytes'] / planned_bytes - 1):+.2f}%)"
    for name, row in mem["quantizers"].items():
        text += f"; {name}: {row['bits_per_param']:.3f} bits/param over {row['layers']} layers"
    if mem["adapter_bytes"]:
        text += f"; adapters: {human_bytes(mem['adapter_bytes'])}"
    return text


# --------------------------------------------------------------------------- prepare for k-bit training


def _kept_trainable(model: nn.Module) -> set[int]:
    """Parameters that stay trainable: the adapters' and ``train`` modules' once ``apply`` ran."""
    info = applied(model)
    if info is None:
        return set()
    keep = {id(p) for _, layer in adapter_layers(model) for p in layer.trainable_parameters()}
    for e in info.plan.entries:
        if e.action == "train":
            keep.update(id(p) for p in model.get_submodule(e.module).parameters())
    return keep


def upcast_to_fp32(model: nn.Module) -> int:
    """Cast every fp16/bf16 parameter to fp32 in place (same ``Parameter`` objects); returns how many.

    Quantized layers keep their codes and scales (buffers); their bias, a parameter, is cast.
    """
    n = 0
    for p in model.parameters():
        if p.dtype in _HALF:
            p.data = p.data.float()
            n += 1
    return n


def input_embeddings(model: nn.Module) -> nn.Module:
    """``model.get_input_embeddings()`` when it has one, else its first ``nn.Embedding``."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except NotImplementedError:
            emb = None
        if emb is not None:
            return emb
    for mod in model.modules():
        if isinstance(mod, nn.Embedding):
            return mod
    raise AdapterhubError(f"{type(model).__name__} has no input embeddings (no get_input_embeddings() and no "
                          "nn.Embedding) to make require grad; pass input_grads=False")


def _make_output_require_grad(module: nn.Module, args: Any, output: Any) -> None:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def enable_input_grads(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (HF ``enable_input_require_grads``), so that a
    checkpointed block whose inputs come from a frozen embedding still passes gradients back."""
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
        return
    emb = input_embeddings(model)
    if not getattr(emb, "_adapterhub_input_grads", False):
        emb.register_forward_hook(_make_output_require_grad)
        emb._adapterhub_input_grads = True


def enable_gradient_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on transformers' gradient (activation) checkpointing with ``use_reentrant``."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise AdapterhubError(f"{type(model).__name__} has no gradient_checkpointing_enable (not a transformers "
                              "model): pass gradient_checkpointing=False and checkpoint its blocks yourself "
                              "(torch.utils.checkpoint)")


def prepare_kbit_training(model: nn.Module, gradient_checkpointing: bool = True, *, use_reentrant: bool = False,
                          upcast: bool = True, input_grads: bool | None = None) -> nn.Module:
    """Prepare ``model`` for training adapters on a quantized base (PEFT's ``prepare_model_for_kbit_training``).

    * freezes every parameter except, once ``apply`` ran, the adapters' and ``train`` modules';
    * ``upcast``: casts every fp16/bf16 parameter to fp32 (norms included; quantized codes untouched);
    * ``input_grads`` (default: ``gradient_checkpointing``): the input embeddings' output requires
      grad, so checkpointed blocks (reentrant ones in particular) see an input that needs grad;
    * ``gradient_checkpointing``: transformers' checkpointing of every block, ``use_reentrant`` as given.
      It recomputes the blocks only in training mode (``model.train()``).

    Returns ``model`` (changed in place). See the module docstring for the order with ``apply``.
    """
    keep = _kept_trainable(model)
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    if upcast:
        upcast_to_fp32(model)
    if input_grads is None:
        input_grads = gradient_checkpointing
    if input_grads:
        enable_input_grads(model)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, use_reentrant)
    return model
