"""``python -m bench overhead``: what LoRA adds to a training step, against the FLOP limit.

Model, input and adapters as ``train_step`` (Llama hidden 1024, intermediate 2816, 4 layers, 16 heads,
vocab 32000, batch 4 x 256, LoRA r=16, alpha=32 on q, k, v, o; fp32 on CPU, bf16 on CUDA). Three models in
one process share the same base weight tensors:

* ``base``       -- the plain model, every weight frozen;
* ``adapterhub`` -- ``attn.{q,k,v,o}_proj -> lora(r=16, alpha=32)``;
* ``PEFT``       -- ``get_peft_model`` with the same targets, r and alpha.

Step (the same for all three): ``inputs_embeds = embed_tokens(ids)``, computed once, detached and made to
require grad; then ``model(inputs_embeds=..., labels=ids).loss.backward()``. So the **base step** is the
forward plus the backward from the loss to the input of every layer -- every data-gradient matmul an
adapter step has to do anyway -- and no weight gradient; an adapted step adds exactly the adapters'
forward, their data gradients and their weight gradients. No optimizer (``train_step`` measures it).

Measured: the three models take turns step by step, the order rotating each round (one torch thread on
CPU); an adapter's **overhead** is its step time / the base step time of the same round, median over the
rounds. **FLOP ratio** (the physical limit: the overhead if every FLOP ran at the base step's speed) =
(base + adapter FLOPs) / base FLOPs, counted per token (:func:`step_flops`): a linear ``in -> out`` costs
``2 in out`` forward and as much for its data gradient; causal attention ``4 h L`` forward and 3x that
in all (``L`` = (seq + 1) / 2 keys on average); the LM head ``2 h V`` twice; a LoRA adapter
``2 r (in + out)`` forward, data gradient and weight gradients: 3x. Element-wise work is not counted.
RESULT ratio = adapterhub overhead / FLOP ratio (1.0 = at the limit); PEFT's is printed beside it.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
import warnings
from typing import Any

from .common import llama, print_table, result_line, synchronize
from .train_step import FULL, QUICK, TARGETS

ROUNDS = {"full": (1, 7), "quick": (1, 2)}  # (warm-up, timed) rounds


def linear_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of every linear in one Llama decoder layer."""
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    d = h // heads
    kv = cfg.get("num_key_value_heads", heads) * d
    return {"q_proj": (h, heads * d), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (heads * d, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def step_flops(cfg: dict[str, Any], batch: int, seq: int, r: int, targets: list[str],
               causal: bool = True) -> dict[str, int]:
    """Matmul FLOPs of one base step (forward + data gradients) and what LoRA on ``targets`` adds.

    ``causal=False`` counts every query against all ``seq`` keys (what an eager attention computes).
    """
    shapes = linear_shapes(cfg)
    h, vocab, layers = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    keys = (seq + 1) / 2 if causal else seq
    linear = sum(2 * i * o for i, o in shapes.values())
    attention = 2 * 2 * (h // heads) * heads * keys  # Q K^T and P V
    per_token = layers * (2 * linear + 3 * attention) + 2 * (2 * h * vocab)
    adapter = layers * sum(3 * 2 * r * (shapes[t][0] + shapes[t][1]) for t in targets)
    tokens = batch * seq
    return {"base": round(tokens * per_token), "adapter": tokens * adapter}


def models(a: dict[str, Any]) -> dict[str, Any]:
    """base, adapterhub and PEFT models sharing one set of base weight tensors."""
    from peft import LoraConfig, get_peft_model

    import adapterhub

    base = llama(a["config"], a["dtype"], a["device"])
    base.requires_grad_(False)

    def shared():  # a copy of base holding base's own weight tensors
        return copy.deepcopy(base, {id(p): p for p in base.parameters()})

    ours = adapterhub.apply(shared(),
                            f"attn.{{{','.join(TARGETS)}}} -> lora(r={a['r']}, alpha={a['alpha']})\n")
    peer = get_peft_model(shared(), LoraConfig(r=a["r"], lora_alpha=a["alpha"], lora_dropout=0.0,
                                                                  target_modules=TARGETS))
    return {"base": base.train(), "adapterhub": ours.train(), "PEFT": peer.train()}


def main(quick: bool = False, device: str = "cpu", dtype: str | None = None, threads: int = 1) -> str:
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecations, raised through PEFT
    torch.set_num_threads(threads)
    a = {**(QUICK if quick else FULL), "device": device,
         "dtype": dtype or ("bfloat16" if device.startswith("cuda") else "float32")}
    ms = models(a)
    names = list(ms)
    ids = torch.randint(0, a["config"]["vocab_size"], (a["batch"], a["seq"]),
                        generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        embeds = ms["base"].model.embed_tokens(ids)
    embeds.requires_grad_(True)

    def step(model) -> float:
        synchronize(device)
        t0 = time.perf_counter()
        model(inputs_embeds=embeds, labels=ids).loss.backward()
        synchronize(device)
        seconds = time.perf_counter() - t0
        embeds.grad = None
        for p in model.parameters():
            p.grad = None
        return seconds

    warmup, rounds = ROUNDS["quick" if quick else "full"]
    times: dict[str, list[float]] = {n: [] for n in names}
    for k in range(warmup + rounds):
        for n in names[k % 3:] + names[:k % 3]:
            seconds = step(ms[n])
            if k >= warmup:
                times[n].append(seconds)
    over = {n: statistics.median(t / b for t, b in zip(times[n], times["base"], strict=True))
            for n in ("adapterhub", "PEFT")}
    flops = step_flops(a["config"], a["batch"], a["seq"], a["r"], TARGETS)
    limit = (flops["base"] + flops["adapter"]) / flops["base"]
    cuda = device.startswith("cuda")
    unit, scale = ("ms", 1e3) if cuda else ("s", 1.0)
    med = {n: statistics.median(ts) for n, ts in times.items()}
    rows = [[n, f"{med[n] * scale:.3f}", f"{over[n]:.3f}" if n in over else "1", f"{limit:.4f}" if n in over else "-",
             f"{over[n] / limit:.3f}" if n in over else "-"] for n in names]
    cfg = a["config"]
    print_table(f"overhead: Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
                f"{cfg['vocab_size']}, {a['dtype']}, batch {a['batch']}x{a['seq']}; LoRA r={a['r']} on q,k,v,o; "
                f"forward + backward to inputs_embeds on {device}{'' if cuda else f', {threads} thread(s)'}; "
                f"{rounds} rounds interleaved",
                ["", f"step {unit} (median)", "overhead (adapted / base)", "FLOP ratio (limit)", "overhead / limit"],
                rows)
    print(f"FLOPs per step: base {flops['base'] / 1e9:.1f} G, adapter +{flops['adapter'] / 1e9:.2f} G "
          f"(+{100 * flops['adapter'] / flops['base']:.2f}%)")
    print(f"PEFT overhead / FLOP ratio: {over['PEFT'] / limit:.3f}")
    return result_line("overhead", "overhead_over_flop_limit", over["adapterhub"] / limit, device=device,
                       dtype=a["dtype"], adapterhub_overhead=f"{over['adapterhub']:.3f}",
                       peft_overhead=f"{over['PEFT']:.3f}", flop_ratio=f"{limit:.4f}",
                       peft_ratio=f"{over['PEFT'] / limit:.3f}", base_step=f"{med['base'] * scale:.3f}{unit}")


if __name__ == "__main__":
    from .__main__ import main as suite

    sys.exit(suite(["overhead", *sys.argv[1:]]))
