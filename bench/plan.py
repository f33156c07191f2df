"""``python -m bench plan``: planning ``attn.* -> lora(r=8)`` on a 70B Llama config (no weights).

adapterhub: ``adapterhub.plan(checkpoint_dir, spec)`` on a directory holding only config.json.
PEFT: the same config built on the meta device, then ``get_peft_model`` with LoRA r=8 on
q/k/v/o -- what a PEFT user runs to see the trainable-parameter count. Each side runs three
times in a fresh process (imports done before timing); the medians are compared.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from .common import mib, print_table, result_line, run_side, side_main

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 4096,
             "rms_norm_eps": 1e-5, "dtype": "bfloat16", "tie_word_embeddings": False}
SPEC = "attn.* -> lora(r=8)\n"


def adapterhub_side(args: dict[str, Any]):
    import adapterhub
    from adapterhub.planning import plan

    adapterhub.get_registry()
    from transformers import AutoConfig, LlamaForCausalLM  # noqa: F401  (imports are not timed, as for PEFT)

    def run():
        p = plan(args["dir"], SPEC)
        return {"trainable": p.trainable, "modules": len(p.entries)}
    return run


def peft_side(args: dict[str, Any]):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, LlamaForCausalLM

    def run():
        cfg = AutoConfig.from_pretrained(args["dir"])
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        return {"trainable": trainable, "modules": 4 * cfg.num_hidden_layers}
    return run


def main() -> str:
    with tempfile.TemporaryDirectory() as d:
        Path(d, "config.json").write_text(json.dumps(LLAMA_70B))
        ours = run_side("bench.plan", "adapterhub", {"dir": d})
        peer = run_side("bench.plan", "peft", {"dir": d})
    if ours["extra"]["trainable"] != peer["extra"]["trainable"]:
        raise SystemExit(f"trainable counts differ: {ours['extra']} vs {peer['extra']}")
    rows = [["adapterhub plan", f"{ours['seconds']:.3f}", mib(ours["peak_bytes"]), f"{ours['extra']['trainable']:,}"],
            ["PEFT get_peft_model (meta)", f"{peer['seconds']:.3f}", mib(peer["peak_bytes"]),
             f"{peer['extra']['trainable']:,}"]]
    print_table("plan: attn.* -> lora(r=8) on Llama-70B config (median of 3 fresh processes)",
                ["", "seconds", "peak RSS above baseline", "trainable params"], rows)
    mem_ratio = ours["peak_bytes"] / peer["peak_bytes"] if peer["peak_bytes"] else float("nan")
    print(f"memory ratio (adapterhub / PEFT): {mem_ratio:.3f}")
    return result_line("plan", "time", ours["seconds"] / peer["seconds"])


if __name__ == "__main__":
    if not side_main({"adapterhub": adapterhub_side, "peft": peft_side}):
        main()
