"""``python -m bench longlora``: one LongLoRA training step, S²-Attn vs full causal attention.

Model: the built-in ``tiny-llama`` (hidden 64, 4 layers, 4 heads, 2 kv heads) adapted with
``attn.* -> lora(r=8, alpha=16)`` and ``layers -> longlora(context=8192)`` (RoPE factor 16, embeddings
and norms trainable). Batch 1 x N tokens, N = 4096 and 8192, fp32 CPU. Sides, each in a fresh process:

* ``s2``   -- the ``adapterhub_s2`` attention in training: S²-Attn, groups of N/4, half the heads shifted;
* ``full`` -- the same adapted model with ``config._attn_implementation = "sdpa"``: full causal attention
  (torch's CPU SDPA; with no padding transformers passes ``is_causal`` and no N x N mask).

Measured on two forward + backward steps after a warm-up step on 256 tokens: seconds per step and the peak RSS
above the RSS before the step (median of 2 processes; glibc's mmap threshold is pinned so freed blocks
leave the RSS). RESULT ratio = S²-Attn peak / full-attention peak at 8k tokens (below 1: S²-Attn saves).

What it shows (2026-11-22, shared 2-core CPU): both peaks grow linearly in N -- torch's CPU causal
SDPA is a fused (flash-style) kernel that never materialises N x N scores, so S²-Attn has no
quadratic memory to save here; its folding copies (and repeating the 2 kv heads to 4) cost ~20% more
(ratio ~1.21 at 4k and 8k). The paper's gain is attention compute (N^2/4 per head instead of N^2/2):
S²-Attn's attention alone is ~2x faster at 8k here, but on this tiny model the whole step is dominated
by element-wise work and the step-time column is noisy on the shared machine.
"""

from __future__ import annotations

import os
from typing import Any

from .common import mib, print_table, result_line, run_side, side_main

SPEC = "attn.* -> lora(r=8, alpha=16)\nlayers -> longlora(context=8192)"
LENGTHS = (4096, 8192)
STEPS = 2  # training steps per process; the time column is per step


def setup(args: dict[str, Any]):
    import torch
    from transformers.utils import logging

    import adapterhub
    from adapterhub.models import build_builtin

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = adapterhub.apply(build_builtin("tiny-llama"), SPEC).train()
    if args["attention"] == "full":
        model.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 260, (1, args["n"]), generator=torch.Generator().manual_seed(0))

    def step(x: torch.Tensor = ids, times: int = STEPS) -> dict[str, Any]:
        for _ in range(times):
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            for p in model.parameters():
                p.grad = None
        return {"loss": float(loss)}

    step(ids[:, :256], 1)  # warm-up: lazy initialisation, thread pools
    return step


SIDES = {f"{att}-{n}": (lambda a, n=n, att=att: setup({"attention": att, "n": n}))
         for n in LENGTHS for att in ("s2", "full")}


def main() -> str:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    res = {side: run_side("bench.longlora", side, {}, repeats=2) for side in SIDES}
    rows = []
    for n in LENGTHS:
        s2, full = res[f"s2-{n}"], res[f"full-{n}"]
        rows.append([n, mib(s2["peak_bytes"]), mib(full["peak_bytes"]), f"{s2['peak_bytes'] / full['peak_bytes']:.3f}",
                     f"{s2['seconds'] / STEPS:.2f}", f"{full['seconds'] / STEPS:.2f}",
                     f"{s2['seconds'] / full['seconds']:.3f}"])
    print_table("longlora: tiny-llama + lora(r=8) on attn + longlora(context=8192); batch 1, forward+backward, "
                "fp32 CPU (median of 2 fresh processes)",
                ["tokens", "S²-Attn peak", "full peak", "ratio", "S²-Attn s", "full s", "time ratio"], rows)
    ratio = res["s2-8192"]["peak_bytes"] / res["full-8192"]["peak_bytes"]
    return result_line("longlora", "peak_memory", ratio)


if __name__ == "__main__":
    if not side_main(SIDES):
        main()
