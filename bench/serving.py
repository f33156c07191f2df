"""``python -m bench serving``: many LoRA adapters, one model -- a mixed batch where every request has its own.

Model: a Llama-shaped decoder from a config with random weights from a fixed seed (hidden 256, intermediate
688, 4 layers, 8 heads, vocab 2048, fp32). Adapters: 512 LoRA bundles on q/k/v/o of every layer, ranks
alternating 8 and 16 (alpha = 2r), random A and B, written once with ``adapterhub.save`` (an adapterhub
bundle is also a PEFT directory: ``adapter_config.json`` + ``adapter_model.safetensors``); both sides read the
same files. For 8, 64 and 512 loaded adapters, a batch of 32 requests (prompts of 16..32 random tokens), each
with a random adapter (all different when there are >= 32), greedy, 24 new tokens:

* adapterhub -- :class:`adapterhub.adapter_pool.AdapterPool` holding the adapters (``slora`` layers: stacked
  per-layer buffers, one gather + two batched matmuls per layer for the whole batch) and
  :func:`adapterhub.generation.generate` (left-padded KV cache, continuous batching engine);
* PEFT -- ``PeftModel`` with every adapter loaded, ``model.generate(..., adapter_names=[...])`` (PEFT's
  mixed-batch inference: per layer, a loop over the adapters present in the batch). The first 64 adapters go
  in with ``load_adapter``; as that call's time grows with the adapters already loaded, the rest go in with
  PEFT's ``update_layer`` directly (see :class:`Peft`).

Each side is one model grown 8 -> 64 -> 512 adapters.

Decode tokens/s = ``32 x 23`` / (time to generate 24 tokens - time to generate 1 token), so the prefill of
both sides is taken out. Each time is the median of ``REPEATS`` runs after a warm-up run (which also pages the
pool's adapters in), the two sides alternating run by run, torch on one thread (see bench/qlora.py for why).
Load time: adding the N adapters (cumulative; pool.add / PEFT as above). The greedy tokens of both sides are
compared row by row. RESULT ratio = adapterhub decode tokens/s / PEFT decode tokens/s at 64 adapters.
``--device cuda``: the same on the GPU (fp32, TF32 off), where the pool's ``slora`` layers run the BGMV
(decode) and SGMV (prefill) Triton kernels; every run ends in a host copy of the tokens, so the clock
reads finished GPU work.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import print_table, result_line

CONFIG = {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 8,
          "num_key_value_heads": 8, "vocab_size": 2048, "max_position_embeddings": 512,
          "tie_word_embeddings": False}
COUNTS = (8, 64, 512)
RANKS = (8, 16)
BATCH, PROMPT_MIN, PROMPT_MAX, NEW = 32, 16, 32, 24
REPEATS = 3
LOAD_ADAPTER_MAX = 64


def base_model():
    """The fp32 Llama of CONFIG with N(0, 0.02) weights from a fixed seed (no eos: every row runs NEW tokens)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**CONFIG, bos_token_id=None, eos_token_id=None, pad_token_id=0))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def write_adapters(base, root: Path, count: int) -> list[Path]:
    """``count`` LoRA bundles (ranks alternating over RANKS) with random A, B (std 0.05) under ``root``."""
    import torch

    import adapterhub

    models = {r: adapterhub.apply(copy.deepcopy(base), f"attn.* -> lora(r={r}, alpha={2 * r})\n") for r in RANKS}
    gen = torch.Generator().manual_seed(1)
    dirs = []
    for i in range(count):
        model = models[RANKS[i % len(RANKS)]]
        with torch.no_grad():
            for _, p in adapterhub.trainable_parameters(model):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        dirs.append(root / f"adapter{i:03d}")
        adapterhub.save(model, dirs[-1])
    return dirs


def requests(count: int) -> tuple[list[list[int]], list[int]]:
    """BATCH prompts and the adapter index of each (distinct when count >= BATCH)."""
    import torch

    gen = torch.Generator().manual_seed(count)
    lengths = torch.randint(PROMPT_MIN, PROMPT_MAX + 1, (BATCH,), generator=gen).tolist()
    prompts = [torch.randint(3, CONFIG["vocab_size"], (n,), generator=gen).tolist() for n in lengths]
    if count >= BATCH:
        which = torch.randperm(count, generator=gen)[:BATCH].tolist()
    else:
        which = torch.randint(0, count, (BATCH,), generator=gen).tolist()
    return prompts, which


class Ours:
    """adapterhub: one AdapterPool on a copy of the base model, grown as adapters are added."""

    def __init__(self, base):
        from adapterhub.adapter_pool import AdapterPool

        self.model = copy.deepcopy(base)
        self.pool = AdapterPool(self.model, max_resident=64)
        self.names: list[str] = []
        self.load_seconds = 0.0

    def add(self, dirs: list[Path]) -> None:
        t0 = time.perf_counter()
        self.names += [self.pool.add(d) for d in dirs]
        self.load_seconds += time.perf_counter() - t0

    def runner(self, prompts, which) -> Callable[[int], list[list[int]]]:
        from adapterhub.generation import generate

        adapters = [self.names[i] for i in which]
        return lambda new: generate(self.model, prompts, adapters, pool=self.pool, max_new_tokens=new)


class Peft:
    """PEFT: one PeftModel on a copy of the base model holding every adapter, grown as adapters are added.

    ``PeftModel.load_adapter`` rescans every module of the model (adapters included) for each adapter it
    loads, so loading takes time quadratic in the number loaded (here ~1 s per adapter once ~100 are loaded;
    512 would take many minutes). Beyond the first ``LOAD_ADAPTER_MAX`` adapters, the rest are put in with
    PEFT's own ``LoraLayer.update_layer`` (the call ``load_adapter`` makes per module) plus a copy of the
    tensors, and registered in ``peft_config``: the same layers, hence the same forward, without the rescans.
    """

    def __init__(self, base):
        self.base = copy.deepcopy(base)
        self.model = None
        self.count = 0
        self.load_seconds = 0.0
        self.direct = 0
        self.layers: list[tuple[str, Any]] | None = None

    def add(self, dirs: list[Path]) -> None:
        from peft import PeftModel

        t0 = time.perf_counter()
        for d in dirs:
            name = f"a{self.count}"
            if self.model is None:
                self.model = PeftModel.from_pretrained(self.base, str(d), adapter_name=name)
            elif self.count < LOAD_ADAPTER_MAX:
                self.model.load_adapter(str(d), adapter_name=name)
            else:
                self._inject(d, name)
                self.direct += 1
            self.count += 1
        self.model.eval()
        self.load_seconds += time.perf_counter() - t0

    def _inject(self, directory: Path, name: str) -> None:
        from peft import LoraConfig
        from peft.tuners.lora import LoraLayer
        from safetensors.torch import load_file

        config = LoraConfig.from_pretrained(str(directory))
        config.inference_mode = True
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        if self.layers is None:
            self.layers = [(n, m) for n, m in self.model.named_modules() if isinstance(m, LoraLayer)]
        for key, layer in self.layers:
            a = tensors[f"{key}.lora_A.weight"]
            layer.update_layer(name, a.shape[0], config.lora_alpha, config)
            layer.lora_A[name].weight.data.copy_(a)
            layer.lora_B[name].weight.data.copy_(tensors[f"{key}.lora_B.weight"])
        self.model.peft_config[name] = config

    def runner(self, prompts, which) -> Callable[[int], list[list[int]]]:
        import torch

        width = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        names = [f"a{i}" for i in which]

        def run(new: int) -> list[list[int]]:
            with torch.no_grad():
                out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                          min_new_tokens=new, do_sample=False, adapter_names=names, pad_token_id=0)
            return out[:, width:].tolist()
        return run


def timed(fn: Callable[..., Any], *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def measure(sides: dict[str, Callable[[int], Any]]) -> dict[str, float]:
    """Decode tokens/s of every side: median over REPEATS of (NEW-token run - 1-token run), runs alternating."""
    full: dict[str, list[float]] = {k: [] for k in sides}
    first: dict[str, list[float]] = {k: [] for k in sides}
    for run in sides.values():
        run(2)  # warm-up (pages the pool's adapters in)
    names = list(sides)
    for k in range(REPEATS):
        for name in names[k % 2:] + names[:k % 2]:
            first[name].append(timed(sides[name], 1))
            full[name].append(timed(sides[name], NEW))
    rate = {}
    for name in names:
        decode = statistics.median(full[name]) - statistics.median(first[name])
        rate[name] = BATCH * (NEW - 1) / max(decode, 1e-9)
    return rate


def main(device: str = "cpu") -> str:
    import torch
    from rich.progress import Progress

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on both sides, so greedy tokens can be compared
    base = base_model()
    rows, ratios = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp, Progress(transient=True) as progress:
        task = progress.add_task(f"writing {max(COUNTS)} LoRA bundles", total=None)
        dirs = write_adapters(base, Path(tmp), max(COUNTS))
        base = base.to(device)
        sides = {"adapterhub": Ours(base), "peft": Peft(base)}
        loaded = 0
        for count in COUNTS:
            progress.update(task, description=f"{count} adapters: loading into the pool and into PEFT")
            for side in sides.values():
                side.add(dirs[loaded:count])
            loaded = count
            prompts, which = requests(count)
            runs = {name: side.runner(prompts, which) for name, side in sides.items()}
            progress.update(task, description=f"{count} adapters: generating")
            a, b = runs["adapterhub"](NEW), runs["peft"](NEW)
            same = sum(x == y for x, y in zip(a, b))
            rate = measure(runs)
            ratios[count] = rate["adapterhub"] / rate["peft"]
            peft_side = sides["peft"]
            peft_load = f"{peft_side.load_seconds:.2f}" + (f" ({peft_side.direct} dir.)" if peft_side.direct else "")
            rows.append([count, len(set(which)), f"{rate['adapterhub']:.0f}", f"{rate['peft']:.0f}",
                         f"{ratios[count]:.2f}x", f"{sides['adapterhub'].load_seconds:.2f}", peft_load,
                         f"{sides['adapterhub'].pool.stats()['device_bytes'] / 2**20:.0f} MiB", f"{same}/{BATCH}"])
    print_table(f"serving: Llama hidden {CONFIG['hidden_size']}, {CONFIG['num_hidden_layers']} layers, vocab "
                f"{CONFIG['vocab_size']}; LoRA r in {set(RANKS)} on q/k/v/o; batch of {BATCH} requests, prompts "
                f"{PROMPT_MIN}-{PROMPT_MAX} tokens, {NEW} new tokens, greedy; "
                f"{torch.cuda.get_device_name(0) + ' (BGMV/SGMV kernels)' if device == 'cuda' else 'CPU, 1 thread'}",
                ["adapters", "in batch", "ours tok/s", "PEFT tok/s", "ratio", "ours load s", "PEFT load s",
                 "pool mem", "same tokens"], rows)
    print("tok/s: decode tokens per second (prefill excluded); adapterhub: AdapterPool + GenerationEngine; "
          "PEFT: PeftModel + generate(adapter_names=...). Load times are cumulative; PEFT's load_adapter is "
          f"quadratic in the adapters loaded, so beyond {LOAD_ADAPTER_MAX} the adapters go in directly "
          "(update_layer + tensor copy; the same layers and forward).")
    return result_line("serving", "decode_tokens_per_s_64_adapters", ratios[64])


if __name__ == "__main__":
    main()
