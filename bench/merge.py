"""``python -m bench merge``: peak memory of merging a LoRA into a ≥ 1 GB checkpoint, adapterhub vs PEFT.

The checkpoint: a Llama-shaped decoder (hidden 2048, intermediate 5632, 8 layers, 16 heads, vocab
32000, untied lm_head) with random N(0, 0.02) **bf16** weights -- 542M parameters, 1.08 GB in 6
safetensors shards + index + config.json, written shard by shard straight from random tensors
(the model is never built) into ``$TMPDIR/adapterhub-bench-merge`` and reused by later runs. The
adapter: ``lora(r=16, alpha=32)`` on every attention and MLP projection (q, k, v, o, gate, up,
down), built with ``adapterhub.apply`` on a meta-device model, random factors, saved as a bundle
(which PEFT loads as is).

Sides, each in a fresh process (imports done before the measurement starts -- for adapterhub that
includes building the meta model once, which imports transformers' Llama code as the PEFT side's
``from transformers import LlamaForCausalLM`` does):

* ``adapterhub`` -- ``adapterhub merge``: :func:`adapterhub.merge_stream.merge_checkpoint`, tensor by
  tensor, the output shards written as it goes;
* ``PEFT`` -- ``LlamaForCausalLM.from_pretrained(bf16)`` + ``PeftModel.from_pretrained`` +
  ``merge_and_unload()`` + ``save_pretrained(max_shard_size="200MB")``.

Measured: peak RSS above the RSS before the merge started (``VmHWM`` after resetting it; glibc's mmap
threshold pinned to 64 KiB so freed blocks leave the RSS). Both outputs are checked to hold the same
merged weights (bf16 rounding apart) on two modules. RESULT ratio = adapterhub peak / PEFT peak.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import mib, print_table, result_line, run_side, side_main

CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 8, "num_attention_heads": 16,
          "num_key_value_heads": 16, "vocab_size": 32000, "max_position_embeddings": 2048,
          "tie_word_embeddings": False, "architectures": ["LlamaForCausalLM"]}
SPEC = "attn.* -> lora(r=16, alpha=32)\nmlp.* -> lora(r=16, alpha=32)\n"
LAYERS_PER_SHARD = 2
CHECK = ["model.layers.3.self_attn.q_proj.weight", "model.layers.7.mlp.down_proj.weight"]


def workdir() -> Path:
    return Path(os.environ.get("ADAPTERHUB_BENCH_DIR") or Path(tempfile.gettempdir()) / "adapterhub-bench-merge")


def _shapes() -> list[list[tuple[str, tuple[int, ...]]]]:
    """The checkpoint's tensors, grouped into shards."""
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = h * CONFIG["num_key_value_heads"] // CONFIG["num_attention_heads"]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[("model.embed_tokens.weight", (v, h))]]
    for start in range(0, CONFIG["num_hidden_layers"], LAYERS_PER_SHARD):
        shard = []
        for layer in range(start, start + LAYERS_PER_SHARD):
            p = f"model.layers.{layer}"
            shard += [(f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                      (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                      (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                      (f"{p}.mlp.down_proj.weight", (h, i)), (f"{p}.input_layernorm.weight", (h,)),
                      (f"{p}.post_attention_layernorm.weight", (h,))]
        shards.append(shard)
    shards.append([("model.norm.weight", (h,)), ("lm_head.weight", (v, h))])
    return shards


def build_checkpoint(path: Path) -> int:
    """Write the random checkpoint shard by shard (one shard in memory at a time); returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    if (path / "model.safetensors.index.json").is_file():
        return json.loads((path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    shards = _shapes()
    gen = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard:
            t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=gen).mul_(0.02)
            tensors[key] = t.to(torch.bfloat16)
            weight_map[key] = name
            total += tensors[key].numel() * 2
        save_file(tensors, str(path / name), metadata={"format": "pt"})
        del tensors
    cfg = {k: v for k, v in CONFIG.items() if k != "architectures"}
    LlamaConfig(**cfg, dtype="bfloat16", architectures=CONFIG["architectures"]).save_pretrained(path)
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def build_bundle(ckpt: Path, path: Path) -> None:
    """A LoRA bundle for the checkpoint, made on a meta-device model (no weights)."""
    import torch
    from transformers import AutoConfig

    import adapterhub
    from adapterhub.models import meta_model_from_config

    if (path / "adapterhub.json").is_file():
        return
    model = meta_model_from_config(AutoConfig.from_pretrained(ckpt))
    adapterhub.apply(model, SPEC, seed=0)
    gen = torch.Generator().manual_seed(1)
    for _, layer in adapterhub.adapter_layers(model):
        for lin in (layer.lora_A, layer.lora_B):
            lin.to_empty(device="cpu")
            with torch.no_grad():
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) * 0.01)
    adapterhub.save(model, path)


def _adapterhub(args: dict[str, Any]):
    from transformers import AutoConfig

    from adapterhub.merge_stream import merge_checkpoint
    from adapterhub.models import meta_model_from_config
    from adapterhub.registry import get_registry

    get_registry()
    meta_model_from_config(AutoConfig.from_pretrained(args["ckpt"]))  # imports, as the PEFT side's are done

    def run() -> dict[str, Any]:
        report = merge_checkpoint(args["ckpt"], args["bundle"], args["out"], progress=False)
        return {"modules": len(report.modules)}
    return run


def _peft(args: dict[str, Any]):
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()

    def run() -> dict[str, Any]:
        model = LlamaForCausalLM.from_pretrained(args["ckpt"], dtype=torch.bfloat16)
        merged = PeftModel.from_pretrained(model, args["bundle"]).merge_and_unload()
        merged.save_pretrained(args["out"], max_shard_size="200MB")
        return {}
    return run


SIDES = {"adapterhub": _adapterhub, "peft": _peft}


def _tensor(path: Path, key: str):
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(path / index[key]), framework="pt") as f:
        return f.get_tensor(key)


def main() -> str:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
    root = workdir()
    t0 = time.perf_counter()
    size = build_checkpoint(root / "checkpoint")
    build_bundle(root / "checkpoint", root / "bundle")
    print(f"checkpoint: {size / 1e9:.2f} GB in {root / 'checkpoint'} (ready in {time.perf_counter() - t0:.0f} s)")
    results, outs = {}, {}
    for side in SIDES:
        outs[side] = root / f"out-{side}"
        shutil.rmtree(outs[side], ignore_errors=True)
        results[side] = run_side("bench.merge", side, {"ckpt": str(root / "checkpoint"), "bundle": str(root / "bundle"),
                                                       "out": str(outs[side])}, repeats=1)
    diffs = [(_tensor(outs["adapterhub"], k).float() - _tensor(outs["peft"], k).float()).abs().max().item()
             for k in CHECK]
    base = [(_tensor(outs["adapterhub"], k).float() - _tensor(root / "checkpoint", k).float()).abs().max().item()
            for k in CHECK]
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    rows = [[side, mib(r["peak_bytes"]), f"{r['peak_bytes'] / size:.3f}", f"{r['seconds']:.1f}"]
            for side, r in results.items()]
    print_table(f"merge: LoRA r=16 on q,k,v,o,gate,up,down into a {size / 1e9:.2f} GB bf16 Llama checkpoint "
                "(hidden 2048, 8 layers, vocab 32000), 2-core CPU",
                ["side", "peak RSS delta", "x checkpoint size", "seconds (CPU, not compared)"], rows)
    print(f"merged weights agree: max |adapterhub - PEFT| = {max(diffs):.3g} (bf16 rounding; the merge changed "
          f"them by up to {max(base):.3g})")
    if max(diffs) > 0.05 * max(base) + 1e-2:
        raise SystemExit("adapterhub's and PEFT's merged weights differ")
    ratio = results["adapterhub"]["peak_bytes"] / results["peft"]["peak_bytes"]
    return result_line("merge", "peak_rss", ratio)


if __name__ == "__main__":
    if not side_main(SIDES):
        main()
