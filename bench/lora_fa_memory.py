"""``python -m bench lora_fa_memory``: activation memory of one training step, LoRA-FA vs LoRA.

Model: a Llama-shaped decoder from a config, random N(0, 0.02) weights (fp32): hidden 1024,
intermediate 2816, 4 layers, 16 heads, vocab 1024; batch 2 x 256 tokens (batch 4 took over five
minutes on the shared 2-core machine; the per-token saving is the same). Adapters (r=16,
alpha=32) on every attention and MLP linear (q, k, v, o, gate, up, down). Sides, each in a fresh
process:

* ``adapterhub lora``      -- ``attn.* -> lora(r=16, alpha=32)`` and the same on ``mlp.*``
* ``adapterhub lora_fa``   -- ``lora_fa(r=16, alpha=32)``: A frozen, its Function keeps only A x
* ``PEFT LoRA``            -- ``get_peft_model`` with the same targets, r and alpha (the peer)
* ``PEFT LoRA, A frozen``  -- PEFT LoRA after ``peft.optimizers.create_lorafa_optimizer``. That
  helper is meant as an optimizer change (B's corrected update), but it also sets
  ``requires_grad=False`` on every ``lora_A``, and torch (2.13) then stops keeping x for A's
  gradient -- so it saves the same activation memory; the row shows it.

Measured on one forward + backward (after a warm-up step on 16 tokens): the bytes of the tensors
autograd saves for backward, read with ``torch.autograd.graph.saved_tensors_hooks`` (distinct
storages, parameters left out: exact and deterministic), and the peak RSS above the RSS before
the step (mean of 2 fresh processes; it varies by < 1% because glibc's mmap threshold is pinned,
so freed activations leave the RSS). RESULT ratio = adapterhub lora_fa saved bytes / PEFT LoRA
saved bytes (whole model: attention, norms and MLP activations included).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from .common import llama, mib, print_table, result_line, run_side, side_main

CONFIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
          "num_key_value_heads": 16, "vocab_size": 1024, "max_position_embeddings": 512,
          "tie_word_embeddings": False}
BATCH, SEQ, R, ALPHA = 2, 256, 16, 32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model():
    """The model with N(0, 0.02) weights and unit norms from a fixed seed (:func:`bench.common.llama`)."""
    return llama(CONFIG)


def _step_fn(model) -> Any:
    """A training step (warmed up on a short input) that returns what autograd saved in its forward."""
    import torch
    from torch.autograd.graph import saved_tensors_hooks

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, SEQ), generator=gen)
    warm_ids = ids[:1, :16]
    params = [p for p in model.parameters()]
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}

    def step(record: bool, ids: torch.Tensor = ids) -> dict[str, Any]:
        storages: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in param_ptrs:
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        with saved_tensors_hooks(pack, lambda t: t) if record else contextlib.nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        for p in params:
            p.grad = None
        trainable = sum(p.numel() for p in params if p.requires_grad)
        return {"saved_bytes": sum(storages.values()), "saved_tensors": len(storages), "trainable": trainable}

    step(False, warm_ids)  # warm-up: lazy initialisation, thread pools, grads' first allocation
    return lambda: step(True)


def adapterhub_side(variant: str):
    def setup(args: dict[str, Any]):
        import adapterhub

        spec = f"attn.* -> {variant}(r={R}, alpha={ALPHA})\nmlp.* -> {variant}(r={R}, alpha={ALPHA})\n"
        return _step_fn(adapterhub.apply(_model(), spec))
    return setup


def peft_side(lorafa_optimizer: bool):
    def setup(args: dict[str, Any]):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(_model(), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
        if lorafa_optimizer:
            from peft.optimizers import create_lorafa_optimizer

            create_lorafa_optimizer(model, r=R, lora_alpha=ALPHA, lr=1e-4)  # freezes every lora_A
        return _step_fn(model)
    return setup


SIDES = {"adapterhub-lora": adapterhub_side("lora"), "adapterhub-lora_fa": adapterhub_side("lora_fa"),
         "peft-lora": peft_side(False), "peft-lora-lorafa-opt": peft_side(True)}
LABELS = {"adapterhub-lora": "adapterhub lora", "adapterhub-lora_fa": "adapterhub lora_fa",
          "peft-lora": "PEFT LoRA", "peft-lora-lorafa-opt": "PEFT LoRA, A frozen*"}


def main() -> str:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # big blocks are mmapped and returned on free
    results = {side: run_side("bench.lora_fa_memory", side, {}, repeats=2) for side in SIDES}
    for side, r in results.items():
        runs = {run["extra"]["saved_bytes"] for run in r["runs"]}
        if len(runs) != 1:
            raise SystemExit(f"{side}: saved bytes differ between runs: {runs}")
    saved = {side: r["extra"]["saved_bytes"] for side, r in results.items()}
    peak = {side: r["peak_bytes"] for side, r in results.items()}
    tokens, hidden, layers = BATCH * SEQ, CONFIG["hidden_size"], CONFIG["num_hidden_layers"]
    x_bytes = tokens * (2 * hidden + CONFIG["intermediate_size"]) * 4 * layers
    rows = [[LABELS[s], f"{r['extra']['trainable']:,}", mib(saved[s]), r["extra"]["saved_tensors"], mib(peak[s])]
            for s, r in results.items()]
    print_table(f"lora_fa_memory: Llama hidden {hidden}, {layers} layers, batch {BATCH} x seq {SEQ}, r={R} "
                "on q,k,v,o,gate,up,down; one forward+backward, fp32 CPU",
                ["", "trainable", "saved for backward", "tensors", "peak RSS delta (mean of 2)"], rows)
    print("* PEFT LoRA after peft.optimizers.create_lorafa_optimizer, which sets requires_grad=False on lora_A:\n"
          "  with A frozen, torch's autograd no longer keeps x for A's gradient, so the saving is the same;\n"
          "  adapterhub's lora_fa guarantees it with its own autograd Function (only A x is kept).")
    print(f"expected saving: the inputs of q/k/v (one tensor), gate/up (one) and down = "
          f"{mib(x_bytes)} (o_proj's input is the attention output, which SDPA keeps anyway)")
    print(f"measured: adapterhub lora - lora_fa = {mib(saved['adapterhub-lora'] - saved['adapterhub-lora_fa'])}, "
          f"PEFT LoRA - adapterhub lora_fa = {mib(saved['peft-lora'] - saved['adapterhub-lora_fa'])}")
    print(f"peak RSS ratio (adapterhub lora_fa / PEFT LoRA): {peak['adapterhub-lora_fa'] / peak['peft-lora']:.3f}")
    return result_line("lora_fa_memory", "activation_memory", saved["adapterhub-lora_fa"] / saved["peft-lora"])


if __name__ == "__main__":
    if not side_main(SIDES):
        main()
