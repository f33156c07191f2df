"""``python -m bench train_step``: one LoRA training step, adapterhub vs PEFT: time and peak memory.

Model: a Llama-shaped decoder from a config -- hidden 1024, intermediate 2816, 4 layers, 16 heads
(16 kv heads), vocab 32000 (Llama's) -- with N(0, 0.02) weights and unit norms from a fixed seed;
fp32 on CPU, bf16 on CUDA (``--dtype`` overrides). Input: one fixed batch of 4 x 256 token ids;
loss: causal-LM cross entropy (labels = ids).

Adapters: LoRA r=16, alpha=32, no dropout on q_proj, k_proj, v_proj, o_proj of every layer --
adapterhub ``attn.{q,k,v,o}_proj -> lora(r=16, alpha=32)``, PEFT ``get_peft_model`` with
``LoraConfig(r=16, lora_alpha=32, target_modules=[q,k,v,o]_proj)``; fp32 adapter tensors on both sides.
Both then get the same adapter values (A, B ~ N(0, 0.02) drawn from a seed per module name; B is
non-zero so every gradient is real work), and the losses of the first and last step must agree.

Step: forward + backward + ``torch.optim.AdamW(lr=1e-4)`` on the trainable tensors + ``zero_grad``.
Each side runs in a fresh process, the processes alternating (adapterhub, PEFT, PEFT, adapterhub, ...):
warm-up steps, then timed steps; a process reports its median step time, a side the median over its
processes. Peak memory: the peak RSS (CUDA: ``max_memory_allocated``) during the warm-up and timed
steps above the value before them (model built, optimizer made, no state yet): activations, logits,
gradients, AdamW state and temporaries. On CPU torch runs on one thread (``--threads``): on the
shared 2-core machine a two-thread step waits for whichever core another process holds.
RESULT ratio = adapterhub / PEFT median step time; the memory ratio is in the table and DETAIL line.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import zlib
from typing import Any

from .common import llama, mib, print_table, result_line, run_sides, side_main, synchronize

FULL = {"config": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4, "num_attention_heads": 16,
                   "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 512,
                   "tie_word_embeddings": False},
        "batch": 4, "seq": 256, "r": 16, "alpha": 32, "warmup": 1, "steps": 4, "repeats": 3}
QUICK = {"config": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "vocab_size": 256, "max_position_embeddings": 64,
                    "tie_word_embeddings": False},
         "batch": 2, "seq": 32, "r": 8, "alpha": 16, "warmup": 1, "steps": 2, "repeats": 1}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SIDES = {"adapterhub": "adapterhub", "peft": "PEFT"}


def settings(quick: bool, device: str, dtype: str | None, threads: int) -> dict[str, Any]:
    """The JSON-able arguments every side process gets."""
    return {**(QUICK if quick else FULL), "device": device, "threads": threads,
            "dtype": dtype or ("bfloat16" if device.startswith("cuda") else "float32")}


def adapted(side: str, a: dict[str, Any]):
    """The model of ``side`` with LoRA on ``TARGETS``; adapter values seeded per module name (both sides alike)."""
    import torch

    model = llama(a["config"], a["dtype"], a["device"])
    if side == "adapterhub":
        import adapterhub
        from adapterhub.surgery import adapter_layers

        model = adapterhub.apply(model, f"attn.{{{','.join(TARGETS)}}} -> lora(r={a['r']}, alpha={a['alpha']})\n")
        pairs = {name: (layer.lora_A.weight, layer.lora_B.weight) for name, layer in adapter_layers(model)}
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=a["r"], lora_alpha=a["alpha"], lora_dropout=0.0,
                                                 target_modules=TARGETS))
        pairs = {name.removeprefix("base_model.model."): (m.lora_A["default"].weight, m.lora_B["default"].weight)
                 for name, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    with torch.no_grad():
        for name, (A, B) in sorted(pairs.items()):
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            for w in (A, B):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.02)
    return model.train()


def side(name: str):
    def setup(a: dict[str, Any]):
        import torch

        torch.set_num_threads(a["threads"])
        device = a["device"]
        model = adapted(name, a)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        ids = torch.randint(0, a["config"]["vocab_size"], (a["batch"], a["seq"]),
                            generator=torch.Generator().manual_seed(0)).to(device)
        cuda = device.startswith("cuda")

        def step() -> float:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        def run() -> dict[str, Any]:
            if cuda:
                synchronize(device)
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            losses, seconds = [], []
            for k in range(a["warmup"] + a["steps"]):
                synchronize(device)
                t0 = time.perf_counter()
                losses.append(step())  # float() waits for the GPU
                if k >= a["warmup"]:
                    seconds.append(time.perf_counter() - t0)
            extra = {"step_seconds": seconds, "losses": losses, "trainable": sum(p.numel() for p in params)}
            if cuda:
                extra["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() - before
                extra["gpu_total_peak_bytes"] = torch.cuda.max_memory_allocated()
            return extra
        return run
    return setup


def main(quick: bool = False, device: str = "cpu", dtype: str | None = None, threads: int = 1) -> str:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # big blocks are mmapped and returned on free
    a = settings(quick, device, dtype, threads)
    res = run_sides("bench.train_step", list(SIDES), a, repeats=a["repeats"])
    ours, peer = res["adapterhub"], res["peft"]
    if ours["extra"]["trainable"] != peer["extra"]["trainable"]:
        raise SystemExit(f"trainable counts differ: {ours['extra']['trainable']} vs {peer['extra']['trainable']}")
    tol = 1e-4 if a["dtype"] == "float32" else 2e-2
    for k in (0, -1):
        l1, l2 = ours["extra"]["losses"][k], peer["extra"]["losses"][k]
        if abs(l1 - l2) > tol * max(1.0, abs(l2)):
            raise SystemExit(f"losses differ at step {k}: adapterhub {l1} vs PEFT {l2} -- not the same computation")
    cuda = device.startswith("cuda")
    key = "gpu_peak_bytes" if cuda else "peak_bytes"
    step = {s: statistics.median(statistics.median(run["extra"]["step_seconds"]) for run in r["runs"])
            for s, r in res.items()}
    peak = {s: statistics.median(run["extra"][key] if cuda else run["peak_bytes"] for run in r["runs"])
            for s, r in res.items()}
    unit, scale = ("ms", 1e3) if cuda else ("s", 1.0)
    rows = [[SIDES[s], f"{step[s] * scale:.3f}",
             f"{min(min(run['extra']['step_seconds']) for run in r['runs']) * scale:.3f}", mib(peak[s]),
             f"{r['extra']['losses'][0]:.4f} -> {r['extra']['losses'][-1]:.4f}"] for s, r in res.items()]
    cfg = a["config"]
    print_table(f"train_step: Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
                f"{cfg['vocab_size']}, {a['dtype']}, batch {a['batch']}x{a['seq']}; LoRA r={a['r']} on q,k,v,o "
                f"({ours['extra']['trainable']:,} trainable); forward+backward+AdamW on {device}"
                f"{'' if cuda else f', {threads} thread(s)'}; {a['steps']} steps x {a['repeats']} fresh processes "
                "per side, taking turns",
                ["", f"step {unit} (median)", f"step {unit} (min)", "peak memory above model", "loss first -> last"],
                rows)
    time_ratio, mem_ratio = step["adapterhub"] / step["peft"], peak["adapterhub"] / peak["peft"]
    print(f"step time ratio (adapterhub / PEFT): {time_ratio:.3f}; peak memory ratio: {mem_ratio:.3f}")
    return result_line("train_step", "step_time", time_ratio, device=device, dtype=a["dtype"],
                       adapterhub_step=f"{step['adapterhub'] * scale:.3f}{unit}",
                       peft_step=f"{step['peft'] * scale:.3f}{unit}",
                       adapterhub_peak=f"{peak['adapterhub'] / 2**20:.1f}MiB",
                       peft_peak=f"{peak['peft'] / 2**20:.1f}MiB",
                       memory_ratio=f"{mem_ratio:.3f}")


if __name__ == "__main__":
    if not side_main({s: side(s) for s in SIDES}):
        from .__main__ import main as suite

        sys.exit(suite(["train_step", *sys.argv[1:]]))
