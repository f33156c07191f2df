"""``python -m bench kernels``: one LoRA / QLoRA layer, adapterhub's fused Triton kernels vs PEFT's layer.

Layers of a 7B Llama (hidden 4096, MLP 11008), bf16 weights and activations, LoRA r=16, alpha=32 with
fp32 adapters on both sides; the same W, A, B (B non-zero) and the same input. Per shape (M tokens x in
-> out): one forward + backward (gradients for x, A and B; W frozen) timed with ``triton.testing.do_bench``
(median ms), and the peak CUDA memory above the operands during it.

* ``fused`` -- adapterhub's layer with ``ADAPTERHUB_KERNELS=auto`` (the Triton kernels, tiles tuned on the
  first call: the time it took is shown apart and not in the step time);
* ``torch`` -- the same layer with ``ADAPTERHUB_KERNELS=torch`` (the reference path);
* ``PEFT`` -- ``get_peft_model`` on the same Linear (QLoRA: on ``bitsandbytes.nn.Linear4bit`` holding the
  same NF4 codes: blocksize 64, double quantization, bf16 compute).

The outputs of the three are compared first (max relative difference). RESULT ratio = the geometric mean,
over every shape, of fused / PEFT step time. Needs CUDA; ``--quick`` runs tiny shapes on the CPU
interpreter instead (``TRITON_INTERPRET=1``: a smoke test of the harness, its times mean nothing).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

from .common import mib, print_table, result_line

R, ALPHA = 16, 32
#: (label, M tokens, in, out, quantized)
SHAPES = [("attn proj, prefill", 4096, 4096, 4096, False), ("mlp up, prefill", 4096, 4096, 11008, False),
          ("mlp down, prefill", 4096, 11008, 4096, False), ("attn proj, decode", 16, 4096, 4096, False),
          ("attn proj, prefill, nf4", 4096, 4096, 4096, True), ("mlp up, prefill, nf4", 4096, 4096, 11008, True),
          ("mlp down, prefill, nf4", 4096, 11008, 4096, True), ("attn proj, decode, nf4", 16, 4096, 4096, True)]
QUICK_SHAPES = [("tiny", 40, 72, 56, False), ("tiny, nf4", 40, 64, 48, True)]


def holder(weight):
    """A module holding one bias-free Linear named ``proj`` with ``weight`` (what both libraries adapt)."""
    import torch
    from torch import nn

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
            with torch.no_grad():
                self.proj.weight.copy_(weight)

        def forward(self, x):
            return self.proj(x)

    return Holder()


def adapterhub_layer(weight, quant: bool, device: str):
    import adapterhub

    clause = " on nf4(compute_dtype=bfloat16)" if quant else ""
    model = adapterhub.apply(holder(weight), f"proj -> lora(r={R}, alpha={ALPHA}){clause}")
    return model.to(device)


def peft_layer(weight, quant: bool, device: str):
    import torch
    from peft import LoraConfig, get_peft_model

    model = holder(weight)
    if quant:
        import bitsandbytes as bnb

        q = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.bfloat16,
                              compress_statistics=True, quant_type="nf4")
        q.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, blocksize=64, compress_statistics=True,
                                     quant_type="nf4")
        model.proj = q
        model.is_loaded_in_4bit = True
    model.requires_grad_(False)
    peft = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["proj"]))
    return peft.to(device)  # .to(cuda) quantizes the bitsandbytes weight there


def share_adapters(ours, peer) -> None:
    """Copy adapterhub's A (kaiming) and a non-zero B into PEFT's layer: the same function on both sides."""
    import torch

    layer = ours.proj
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
        target = peer.base_model.model.proj
        target.lora_A["default"].weight.copy_(layer.lora_A.weight)
        target.lora_B["default"].weight.copy_(layer.lora_B.weight)


class kernels_mode:
    """``ADAPTERHUB_KERNELS=mode`` inside the block (``None``: leave it as it is)."""

    def __init__(self, mode: str | None) -> None:
        self.mode, self.old = mode, None

    def __enter__(self) -> None:
        self.old = os.environ.get("ADAPTERHUB_KERNELS")
        if self.mode is not None:
            os.environ["ADAPTERHUB_KERNELS"] = self.mode

    def __exit__(self, *exc: Any) -> None:
        if self.mode is None:
            return
        if self.old is None:
            os.environ.pop("ADAPTERHUB_KERNELS", None)
        else:
            os.environ["ADAPTERHUB_KERNELS"] = self.old


def step_fn(model, x, g, mode: str | None) -> Callable[[], None]:
    """One forward + backward of ``model(x)`` against the output gradient ``g``, under ``mode``."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        with kernels_mode(mode):
            x.grad = None
            for p in params:
                p.grad = None
            model(x).backward(g)
    return step


def timed_ms(step: Callable[[], None], device: str) -> float:
    if device == "cuda":
        import triton

        return float(triton.testing.do_bench(step, warmup=25, rep=100))
    step()
    t0 = time.perf_counter()
    step()
    return (time.perf_counter() - t0) * 1e3


def peak_bytes(step: Callable[[], None], device: str) -> int:
    import torch

    if device != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def output(model, x, mode: str | None):
    import torch

    with kernels_mode(mode), torch.no_grad():
        return model(x).float()


def rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def measure_shape(label: str, m: int, k: int, n: int, quant: bool, device: str, fused_mode: str) -> dict[str, Any]:
    import torch

    from adapterhub.plugins import _tile_tuning as tiles

    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
    ours, peer = adapterhub_layer(weight, quant, device), peft_layer(weight, quant, device)
    share_adapters(ours, peer)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=torch.bfloat16).requires_grad_(True)
    g = torch.randn(m, n, generator=gen).to(device=device, dtype=torch.bfloat16)
    tuned = set(tiles._MEMORY)
    t0 = time.perf_counter()
    y_fused = output(ours, x, fused_mode)  # the first fused call tunes the forward tiles
    step_fn(ours, x, g, fused_mode)()  # and the backward's
    if device == "cuda":
        torch.cuda.synchronize()
    tune_s = time.perf_counter() - t0
    new_tiles = {key.split("|")[0]: blocks for key, blocks in tiles._MEMORY.items() if key not in tuned}
    y_torch, y_peft = output(ours, x, "torch"), output(peer, x, None)
    sides = {"fused": (ours, fused_mode), "torch": (ours, "torch"), "PEFT": (peer, None)}
    ms = {name: timed_ms(step_fn(model, x, g, mode), device) for name, (model, mode) in sides.items()}
    mem = {name: peak_bytes(step_fn(model, x, g, mode), device) for name, (model, mode) in sides.items()}
    del ours, peer, x, g
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"label": label, "shape": f"{m} x {k} -> {n}", "ms": ms, "mem": mem, "tune_s": tune_s,
            "tiles": new_tiles, "diff_torch": rel(y_fused, y_torch), "diff_peft": rel(y_fused, y_peft)}


def tiles_text(tiles: dict[str, dict[str, int]]) -> str:
    return "; ".join(f"{k}: {b['BLOCK_M']}x{b['BLOCK_N']}x{b['BLOCK_K']} w{b['num_warps']} s{b['num_stages']}"
                     for k, b in sorted(tiles.items()) if "num_warps" in b) or "-"


def main(quick: bool = False, device: str = "cuda") -> str:
    import torch

    warnings.filterwarnings("ignore")
    if quick:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("bench kernels --quick runs on the CPU interpreter: set TRITON_INTERPRET=1")
        device, fused_mode, shapes = "cpu", "triton", QUICK_SHAPES
    else:
        if device != "cuda" or not torch.cuda.is_available():
            raise SystemExit("bench kernels times the Triton kernels on CUDA: run it on a GPU machine "
                             "(--quick runs a CPU-interpreter smoke test instead)")
        device, fused_mode, shapes = "cuda", "auto", SHAPES
    torch.backends.cuda.matmul.allow_tf32 = False
    rows, ratios = [], []
    for label, m, k, n, quant in shapes:
        try:
            got = measure_shape(label, m, k, n, quant, device, fused_mode)
        except Exception as exc:  # e.g. bitsandbytes without its CUDA library: that row only
            rows.append([label, f"{m} x {k} -> {n}", "failed", str(exc).splitlines()[0][:80], "", "", "", "", ""])
            continue
        ms, mem = got["ms"], got["mem"]
        ratios.append(ms["fused"] / ms["PEFT"])
        rows.append([label, got["shape"], f"{ms['fused']:.3f}", f"{ms['torch']:.3f}", f"{ms['PEFT']:.3f}",
                     f"{ms['fused'] / ms['PEFT']:.3f}",
                     f"{mib(mem['fused'])} / {mib(mem['PEFT'])}" if device == "cuda" else "-",
                     f"{got['diff_torch']:.1e} / {got['diff_peft']:.1e}",
                     f"{got['tune_s']:.1f} s: {tiles_text(got['tiles'])}"])
    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU interpreter (smoke test, times meaningless)"
    print_table(f"kernels: one LoRA layer (r={R}), bf16, forward + backward, {where}",
                ["layer", "tokens x in -> out", "fused ms", "torch ms", "PEFT ms", "fused / PEFT",
                 "peak mem fused / PEFT", "max rel diff vs torch / PEFT", "tuning: time, tiles"], rows)
    if not ratios:
        raise SystemExit("no shape could be measured")
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    return result_line("kernels", "layer_step_time", geo, shapes=len(ratios), device=device)


if __name__ == "__main__":
    main()
