"""``adapterhub quickstart``: plan -> apply -> train a few steps -> save -> reload, on built-ins."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from adapterhub.dsl import parse
from adapterhub.registry import AdapterhubError

QUICKSTART_SPEC = """\
# adapterhub quickstart: LoRA on attention, QLoRA-style LoRA on an NF4-quantized MLP
attn.* -> lora(r=8, alpha=16)
mlp.*  -> lora(r=4, alpha=8) on nf4
"""

CORPUS = (
    "Low-rank adaptation freezes the pretrained weights and learns a small update for each layer. "
    "The update is the product of two thin matrices, so it trains quickly and stores compactly. "
    "Quantizing the frozen weights to four bits shrinks memory further while the adapter trains on top. "
    "A surgery file says which layers get which adapter, and the plan shows what it costs. "
) * 8


def byte_batches(text: str, seq_len: int, batch: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Random windows of the UTF-8 bytes of ``text`` (the built-in models' byte tokenizer)."""
    ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    if len(ids) <= seq_len:
        raise AdapterhubError(f"the training text has {len(ids)} bytes; need more than {seq_len}")
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - seq_len, (batch,), generator=g)
        out.append(torch.stack([ids[s:s + seq_len] for s in starts.tolist()]))
    return out


def run_quickstart(model_name: str, out: Path, steps: int, seed: int, console: Console) -> None:
    from .bundle import load, save
    from .models import BUILTIN_MODELS, load_model
    from .planning import plan
    from .report import print_plan
    from .surgery import apply, trainable_parameters

    if model_name in BUILTIN_MODELS and BUILTIN_MODELS[model_name]["family"] == "bert":
        raise AdapterhubError("the quickstart trains a causal language model: use tiny-llama or tiny-gpt2")
    spec = parse(QUICKSTART_SPEC, filename="quickstart.surgery")
    console.print(f"[bold]1. spec[/bold] quickstart.surgery\n{QUICKSTART_SPEC}", highlight=False)
    model = load_model(model_name, seed=0)
    console.print(f"[bold]2. plan[/bold] on {model_name}")
    print_plan(plan(model, spec), console)

    apply(model, spec, seed=seed)
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=3e-3)
    batches = byte_batches(CORPUS, seq_len=64, batch=8, steps=steps, seed=seed)
    model.train()
    losses = []
    start = time.perf_counter()
    with Progress(TextColumn("[bold]3. train[/bold]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("loss {task.fields[loss]:.3f}"), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("train", total=steps, loss=float("nan"))
        for ids in batches:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            bar.update(task, advance=1, loss=losses[-1])
    elapsed = time.perf_counter() - start
    model.eval()
    console.print(f"   loss {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps "
                  f"({steps * 8 * 64 / elapsed:,.0f} tokens/s)")

    save(model, out, metrics={"train_loss_first": round(losses[0], 4), "train_loss_last": round(losses[-1], 4),
                              "steps": steps})
    console.print(f"[bold]4. saved[/bold] bundle {out}/ ({', '.join(sorted(p.name for p in out.iterdir()))})")

    probe = batches[0][:2]
    with torch.no_grad():
        expected = model(input_ids=probe).logits
        fresh = load(load_model(model_name, seed=0), out)
        got = fresh(input_ids=probe).logits
    diff = (got - expected).abs().max().item()
    console.print(f"[bold]5. reloaded[/bold] from {out}: max |logit difference| = {diff:.2e}")
    if diff > 1e-4:
        raise AdapterhubError(f"reloaded bundle gives different outputs (max difference {diff:.3e})")
