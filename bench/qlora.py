"""``python -m bench qlora``: QLoRA -- bf16 LoRA vs adapterhub ``lora on nf4`` vs PEFT's QLoRA.

Model: a Llama-shaped decoder from a config, random N(0, 0.02) weights in bf16: hidden 1024,
intermediate 2816, 4 layers, 16 heads, vocab 1024 (51M parameters); input: one fixed batch of
2 x 128 token ids. LoRA r=16, alpha=32 on every attention and MLP linear (q, k, v, o, gate, up,
down); the embedding, norms and head stay bf16 and frozen; adapters are fp32 on every side.

* ``bf16 LoRA`` (adapterhub) -- ``attn.* -> lora(r=16, alpha=32)`` and the same on ``mlp.*``
* ``lora on nf4`` (adapterhub) -- the same with ``on nf4(compute_dtype=bfloat16)`` (blocksize 64,
  double quantization: QLoRA's defaults)
* ``PEFT QLoRA`` (the peer) -- the same bf16 weights in ``bitsandbytes.nn.Linear4bit`` (nf4,
  blocksize 64, double quant, bf16 compute), ``model.is_loaded_in_4bit = True`` (what transformers
  sets when it loads a 4-bit model; PEFT dispatches its bnb LoRA layer only then), then
  ``get_peft_model`` with the same targets, r and alpha. Both 4-bit sides hold bit-identical codes
  and scales (checked below).

Measured: weight memory -- the bytes of the tensors the base model holds (codes, every scale
level, code tables, dense parameters; :func:`adapterhub.kbit.quant_memory` for adapterhub), adapters
listed apart; one forward+backward of a causal-LM loss, timed as the median of 9 steps after 2
warm-up steps (the minimum is shown too). The three models live in one process and take turns step
by step, the order rotating each round, and torch runs on one thread: on the shared 2-core machine
a two-thread step waits for whichever core another process holds, which made single steps vary
five-fold; one thread gives steps within ~10% of each other. Also shown: the bytes autograd keeps
for backward (distinct storages, parameters excluded) -- adapterhub's ``QuantizedLinear`` keeps the
dequantized bf16 weight of every quantized layer for the input gradient, bitsandbytes'
``MatMul4Bit`` dequantizes again in backward. RESULT ratio = adapterhub nf4 median step time / PEFT
QLoRA median step time. Runs in about a minute. ``--device cuda``: the models are built and quantized
on the CPU (the same codes), then moved to the GPU, where adapterhub's 4-bit layers run the fused
dequantize-GEMM Triton kernel; batch 8 x 512, 20 steps, the clock read after a CUDA synchronize.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

from .common import llama, mib, print_table, result_line, synchronize

CONFIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
          "num_key_value_heads": 16, "vocab_size": 1024, "max_position_embeddings": 512,
          "tie_word_embeddings": False}
BATCH, SEQ, R, ALPHA = 2, 128, 16, 32
WARMUP, STEPS = 2, 9
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base_model():
    """The bf16 model with N(0, 0.02) weights and unit norms from a fixed seed (:func:`bench.common.llama`)."""
    return llama(CONFIG, "bfloat16")


def adapterhub_model(base, quant: str):
    import adapterhub

    spec = "".join(f"{role}.* -> lora(r={R}, alpha={ALPHA}){quant}\n" for role in ("attn", "mlp"))
    return adapterhub.apply(copy.deepcopy(base), spec)


def peft_qlora_model(base):
    """PEFT's QLoRA on ``base``'s weights held by ``bitsandbytes.nn.Linear4bit``."""
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    model = copy.deepcopy(base)
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=mod.bias is not None,
                                  compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4")
            q.weight = bnb.nn.Params4bit(mod.weight.data.clone(), requires_grad=False, blocksize=64,
                                         compress_statistics=True, quant_type="nf4")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))  # .to() quantizes
    model.is_loaded_in_4bit = True
    for p in model.parameters():
        p.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))


def peft_weight_bytes(model) -> tuple[int, int]:
    """(base weight bytes, adapter bytes) of a PEFT model with bnb 4-bit layers, from its tensors."""
    import bitsandbytes as bnb

    base = adapters = 0
    for name, p in model.named_parameters():
        if "lora_" in name:
            adapters += p.numel() * p.element_size()
        else:
            base += p.numel() * p.element_size()
    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = mod.weight.quant_state
            tensors = [qs.absmax, qs.code]
            if qs.nested:
                tensors += [qs.state2.absmax, qs.state2.code, qs.offset]
            base += sum(t.numel() * t.element_size() for t in tensors)
    return base, adapters


def same_codes(ours, peft_model) -> bool:
    """Whether adapterhub's and bitsandbytes' 4-bit storage of the first layer's q_proj agree exactly."""
    import torch

    a = ours.model.layers[0].self_attn.q_proj.base_layer
    b = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    qs = b.quant_state
    return (torch.equal(a.qweight.reshape(-1), b.data.reshape(-1)) and torch.equal(a.absmax, qs.absmax)
            and torch.equal(a.nested_absmax, qs.state2.absmax))


def step_fn(model, ids, device: str = "cpu") -> Callable[[], float]:
    """One forward + backward; returns its wall seconds (gradients dropped afterwards)."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        synchronize(device)
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        synchronize(device)
        seconds = time.perf_counter() - t0
        for p in params:
            p.grad = None
        return seconds
    return step


def saved_bytes(model, ids) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    from torch.autograd.graph import saved_tensors_hooks

    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for p in model.parameters():
        p.grad = None
    return sum(storages.values())


def main(device: str = "cpu") -> str:
    import torch

    warnings.filterwarnings("ignore")
    from adapterhub.kbit import quant_memory

    torch.set_num_threads(1)
    cuda = device == "cuda"
    batch, seq, steps_n = (8, 512, 20) if cuda else (BATCH, SEQ, STEPS)  # a GPU needs more work per step
    base = _base_model()
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    models: dict[str, Any] = {  # built and quantized on the CPU (the same codes everywhere), then moved
        "bf16 LoRA": adapterhub_model(base, "").to(device),
        "lora on nf4": adapterhub_model(base, " on nf4(compute_dtype=bfloat16)").to(device),
        "PEFT QLoRA": peft_qlora_model(base).to(device),
    }
    del base
    names = list(models)
    ours, peer = names[1], names[2]
    identical = same_codes(models[ours], models[peer])
    weights, adapters, trainable = {}, {}, {}
    for name, m in models.items():
        m.train()
        trainable[name] = sum(p.numel() for p in m.parameters() if p.requires_grad)
        if m is models[peer]:
            weights[name], adapters[name] = peft_weight_bytes(m)
        else:
            mem = quant_memory(m)
            weights[name], adapters[name] = mem["weight_bytes"], mem["adapter_bytes"]
    if len(set(trainable.values())) != 1:
        raise SystemExit(f"trainable counts differ: {trainable}")
    saved = {name: saved_bytes(m, ids) for name, m in models.items()}
    steps = {name: step_fn(m, ids, device) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(WARMUP + steps_n):
        for name in names[k % 3:] + names[:k % 3]:
            seconds = steps[name]()
            if k >= WARMUP:
                times[name].append(seconds)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    rows = [[name, mib(weights[name]), mib(adapters[name]), mib(saved[name]), f"{median[name]:.3f}",
             f"{min(times[name]):.3f}"] for name in names]
    print_table(f"qlora: Llama hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, bf16, "
                f"batch {batch}x{seq}, LoRA r={R} on all linears ({trainable[ours]:,} trainable); "
                f"forward+backward, {torch.cuda.get_device_name(0) + ' (fused kernels)' if cuda else 'CPU, 1 thread'}, "
                f"{steps_n} steps interleaved",
                ["", "base weights", "adapters", "saved for bwd", "step s (median)", "step s (min)"], rows)
    print("bf16 LoRA, lora on nf4: adapterhub; lora on nf4 = on nf4(compute_dtype=bfloat16); "
          "PEFT QLoRA: bitsandbytes Linear4bit (nf4, double quant, bf16 compute) + get_peft_model")
    print(f"same NF4 codes and scales in adapterhub and bitsandbytes: {'yes' if identical else 'NO'}")
    print(f"weight memory ratio: adapterhub nf4 / PEFT QLoRA = {weights[ours] / weights[peer]:.3f}, "
          f"adapterhub nf4 / bf16 LoRA = {weights[ours] / weights[names[0]]:.3f}")
    print(f"step time ratio (median): adapterhub nf4 / PEFT QLoRA = {median[ours] / median[peer]:.3f}, "
          f"adapterhub nf4 / bf16 LoRA = {median[ours] / median[names[0]]:.3f}")
    return result_line("qlora", "step_time", median[ours] / median[peer])


if __name__ == "__main__":
    main()
