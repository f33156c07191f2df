"""Fine-tuning the adapters of a spec as a causal LM: ``adapterhub.train`` and ``adapterhub train``.
Encoders (BERT family) train as sequence classifiers on labelled ``.jsonl`` instead: the same loop with
the data, loss and eval accuracy of :mod:`adapterhub.train_cls` (model and head: :mod:`adapterhub.train_head`).

``train(model, spec, data, out=..., **options) -> TrainResult``. The optimizer (``make_optimizer``:
adamw, adamw_8bit, paged_*) covers the trainable tensors; the learning rate rises linearly over
``warmup_steps`` (``lr * (s+1) / warmup``) and then stays constant or follows a cosine to 0. One
optimizer step averages ``grad_accum`` micro-batches of ``batch_size`` packed sequences. Batches are a
pure function of (seed, micro-batch index), so a run is reproducible and resumable.

Checkpoints (every ``save_every`` steps, and at the end) go to ``OUT/checkpoint/``, replaced
atomically: ``adapter/`` (a bundle), ``optimizer.safetensors`` (every tensor of the optimizer state,
keyed ``<param index>.<name>``, nested dicts as further ``.<name>`` parts -- AdamW's ``exp_avg``,
``exp_avg_sq``, ``step``; bitsandbytes' quantized states), ``state.json`` (step, tokens, seconds, losses,
optimizer param groups and non-tensor state) and ``rng.safetensors`` (torch's RNG state); never pickle.
``resume=True`` restores them all and continues at the next step: the result equals an uninterrupted
run (the tests check it to fp32 tolerance, with and without gradient accumulation).

The module is named ``training``, not ``train``: importing a submodule ``adapterhub.train`` would set
the package attribute ``train`` to the module and shadow the lazily exported function.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from adapterhub.registry import AdapterhubError

from .atomic import atomic_dir
from .train_data import Tokenizer, build_dataset, byte_tokenizer, load_tokenizer

CHECKPOINT = "checkpoint"
SCHEDULES = ("cosine", "constant")


@dataclass
class TrainResult:
    """What a run produced: the bundle directory, metrics, per-step losses and the stored version."""

    out: Path | None
    metrics: dict[str, Any]
    losses: list[float]
    eval_losses: list[tuple[int, float]]
    model: nn.Module = field(repr=False)
    version: str | None = None


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _resolve_model(model: str | nn.Module, tokenizer: Any, seed: int) -> tuple[nn.Module, Tokenizer]:
    from .models import BYTE_VOCAB, load_model, resolve_source
    from .train_data import hf_tokenizer

    if isinstance(model, str):
        src = resolve_source(model)
        module = load_model(src, seed=seed)
        if tokenizer is None:
            tokenizer = byte_tokenizer() if src.kind == "builtin" else load_tokenizer(src.path)
    else:
        module = model
    if tokenizer is None:
        if getattr(getattr(module, "config", None), "vocab_size", None) != BYTE_VOCAB:
            raise AdapterhubError("pass tokenizer=... : this model is not a built-in byte-level model")
        tokenizer = byte_tokenizer()
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = hf_tokenizer(tokenizer)
    return module, tokenizer


def _lm_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and ids.device.type == "cpu"), \
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16 and ids.device.type == "cuda"):
        return model(input_ids=ids, labels=labels).loss.float()


def evaluate(model: nn.Module, data: Any, bf16: bool = False) -> float | None:
    """Mean loss over the held-out sequences (token-weighted), or None without an eval split."""
    return eval_metrics(model, data, bf16).get("eval_loss")


@torch.no_grad()
def eval_metrics(model: nn.Module, data: Any, bf16: bool = False) -> dict[str, float]:
    """``{"eval_loss": ...}`` (a classification run adds ``"eval_accuracy"``); {} without an eval split."""
    from .train_cls import ClsDataset, evaluate_batches

    if isinstance(data, ClsDataset):
        return evaluate_batches(model, data.eval_batches(), bf16)
    batches = data.eval_batches()
    if not batches:
        return {}
    was = model.training
    model.eval()
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for ids, labels in batches:
        n = int((labels[:, 1:] != -100).sum())
        if n:
            total += _lm_loss(model, ids.to(device), labels.to(device), bf16).item() * n
            count += n
    model.train(was)
    return {"eval_loss": total / count} if count else {}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write the adapter bundle, optimizer tensors, RNG and ``state`` to ``directory`` atomically."""
    from .bundle import save

    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    other: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        _split_state(st, str(idx), tensors, other)
    with atomic_dir(directory) as tmp:
        save(model, tmp / "adapter")
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        doc = dict(state, param_groups=sd["param_groups"], optimizer_other=other)
        (tmp / "state.json").write_text(json.dumps(doc, indent=1) + "\n")


def _split_state(st: dict[str, Any], prefix: str, tensors: dict[str, torch.Tensor], other: dict[str, Any]) -> None:
    """Flatten one parameter's optimizer state: tensors (nested dicts too) under dotted keys, the rest to JSON."""
    for key, v in st.items():
        if "." in key:
            raise AdapterhubError(f"cannot checkpoint optimizer state key {key!r} (it contains a '.')")
        if isinstance(v, dict):
            _split_state(v, f"{prefix}.{key}", tensors, other)
        elif isinstance(v, torch.Tensor):
            tensors[f"{prefix}.{key}"] = v.detach().to("cpu").contiguous().clone()
        else:
            other[f"{prefix}.{key}"] = v


def load_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into ``model`` (already applied) and ``opt``; with
    ``run``, first check that the checkpoint was made with the same settings."""
    from .bundle import load

    if not (directory / "state.json").is_file():
        raise AdapterhubError(f"cannot resume: no checkpoint in '{directory}' (state.json is missing)")
    doc = json.loads((directory / "state.json").read_text())
    before = doc.get("run", {})
    changed = ", ".join(f"{k}={before.get(k)!r}" for k in (run or {}) if before.get(k) != run[k])
    if changed:
        raise AdapterhubError(f"cannot resume from '{directory}': it was trained with other settings ({changed}); "
                              "resume with the same spec, data options, seed and optimizer")
    load(model, directory / "adapter", check_base=False)
    flat: dict[str, Any] = dict(doc.pop("optimizer_other"))
    flat.update(load_file(str(directory / "optimizer.safetensors")))
    state: dict[int, dict[str, Any]] = {}
    for key, v in flat.items():
        idx, *path = key.split(".")
        node = state.setdefault(int(idx), {})
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = v
    groups = doc.pop("param_groups")
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(load_file(str(directory / "rng.safetensors"))["cpu"])
    return doc


# --------------------------------------------------------------------------- the loop


def train(model: str | nn.Module, spec: Any, data: str | Path, *, out: str | Path | None = None,
          name: str | None = None, tokenizer: Any = None, seq_len: int = 128, batch_size: int = 8,
          grad_accum: int = 1, lr: float = 2e-4, warmup_steps: int = 0, schedule: str = "cosine",
          steps: int | None = None, epochs: float | None = None, optimizer: str = "adamw",
          grad_checkpointing: bool = False, bf16: bool = False, eval_split: float = 0.0,
          eval_every: int | None = None, seed: int = 0, save_every: int | None = None, resume: bool = False,
          console: Any = None, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train the adapters ``spec`` puts on ``model`` (a module or a ``--model`` name) on ``data``.

    Give ``steps`` (optimizer steps) or ``epochs`` (passes over the training sequences). With ``out``
    the final bundle (metrics in its manifest) is written there and checkpoints go to ``out/checkpoint``;
    with ``name`` the bundle is also stored as the next version of ``name``. ``console``: a rich
    console for the progress bar (None: silent). ``on_step(step, loss)`` is called after each step.
    """
    from .kbit import enable_gradient_checkpointing, enable_input_grads
    from .optim import make_optimizer
    from .surgery import applied, apply, trainable_parameters
    from .train_cls import cls_loss
    from .train_cls import prepare as prepare_cls
    from .train_dist import on_main, setup
    from .train_head import is_classifier

    if schedule not in SCHEDULES:
        raise AdapterhubError(f"unknown --schedule '{schedule}' (known: {', '.join(SCHEDULES)})")
    for label, v in (("--seq-len", seq_len), ("--batch-size", batch_size), ("--grad-accum", grad_accum)):
        if v < 1:
            raise AdapterhubError(f"{label} must be >= 1, got {v}")
    if (steps is None) == (epochs is None):
        raise AdapterhubError("give exactly one of --steps and --epochs")
    if (resume or save_every or name) and out is None:
        raise AdapterhubError("--resume, --save-every and --name need --out")
    ctx = setup()  # under torchrun: --batch-size is per process; the global batch is world * batch_size
    torch.manual_seed(seed)
    classify = is_classifier(model)
    if classify:  # an encoder: sequence classification on labelled .jsonl (train_cls; the spec gains the head)
        module, dataset, spec = prepare_cls(model, spec, data, tokenizer=tokenizer, seq_len=seq_len,
                                            batch_size=batch_size * ctx.world, eval_split=eval_split, seed=seed,
                                            console=console if ctx.is_main else None)
    else:
        module, tok = _resolve_model(model, tokenizer, seed)
        dataset = build_dataset(data, tok, seq_len=seq_len, batch_size=batch_size * ctx.world,
                                eval_split=eval_split, seed=seed)
    loss_fn = cls_loss if classify else _lm_loss
    if ctx.enabled and dataset.batch_size != batch_size * ctx.world:
        raise AdapterhubError(f"the training data gives {dataset.batch_size} training sequences: fewer than one global "
                              f"batch of {ctx.world} processes x --batch-size {batch_size}; give more data or a "
                              "smaller --batch-size or --seq-len")
    if ctx.device is not None:
        module.to(ctx.device)
    total = steps if steps is not None else max(1, math.ceil(epochs * dataset.batches_per_epoch / grad_accum))
    if total < 1:
        raise AdapterhubError(f"--steps must be >= 1, got {total}")
    apply(module, spec, seed=seed)
    if grad_checkpointing:
        enable_input_grads(module)
        enable_gradient_checkpointing(module)
    params = [p for _, p in trainable_parameters(module)]
    opt = make_optimizer(params, optimizer, lr=lr)
    out_dir = Path(out) if out is not None else None
    ckpt = out_dir / CHECKPOINT if out_dir is not None else None
    run = {"spec": applied(module).plan.spec.source, "seq_len": seq_len, "batch_size": dataset.batch_size,
           "grad_accum": grad_accum, "seed": seed, "eval_split": eval_split, "optimizer": optimizer}
    state: dict[str, Any] = {"step": 0, "tokens": 0, "seconds": 0.0, "losses": [], "eval_losses": [], "run": run}
    if resume:
        assert ckpt is not None
        state.update(load_checkpoint(ckpt, module, opt, run))
    net = ctx.wrap(module)  # DDP after apply (tied tensors are already one Parameter) and after resume
    device = params[0].device
    module.train()
    start = time.perf_counter() - state["seconds"]
    progress = _progress(console if ctx.is_main else None, total)
    task = progress.add_task("train", total=total, completed=state["step"], loss=float("nan"), tps=0.0) \
        if progress else None
    run_start, run_tokens = time.perf_counter(), 0
    try:
        while state["step"] < total:
            step = state["step"]
            ctx.seed_step(seed, step)  # several processes: dropout masks differ per rank, resumable
            for g in opt.param_groups:
                g["lr"] = lr * lr_factor(step, total, warmup_steps, schedule)
            step_loss = 0.0
            for micro in range(grad_accum):
                ids, labels = dataset.batch(step * grad_accum + micro)
                n_tokens = dataset.tokens(ids)  # the global micro-batch: tokens of every rank
                run_tokens += n_tokens
                state["tokens"] += n_tokens
                ids, labels, weight = ctx.shard(ids, labels)
                with ctx.no_sync(net, sync=micro == grad_accum - 1):  # DDP averages on the last micro-batch
                    loss = loss_fn(net, ids.to(device), labels.to(device), bf16)
                    (loss * weight / grad_accum).backward()
                step_loss += loss.item() * weight / ctx.world / grad_accum
            step_loss = ctx.all_reduce_sum([step_loss])[0]  # the global batch's loss (train_dist doc)
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] = step + 1
            state["losses"].append(step_loss)
            if eval_every and state["step"] % eval_every == 0 and state["step"] < total:
                ev = evaluate(module, dataset, bf16)
                if ev is not None:
                    state["eval_losses"].append([state["step"], ctx.mean(ev)])
            state["seconds"] = time.perf_counter() - start
            if ckpt is not None and save_every and state["step"] % save_every == 0:
                on_main(ctx, save_checkpoint, ckpt, module, opt, state)
            if progress:
                tps = run_tokens / max(1e-9, time.perf_counter() - run_start)
                progress.update(task, completed=state["step"], loss=step_loss, tps=tps)
            if on_step is not None:
                on_step(state["step"], step_loss)
    finally:
        if progress:
            progress.stop()
    final = eval_metrics(module, dataset, bf16)
    final_eval = final.get("eval_loss")
    if final_eval is not None:
        final_eval = ctx.mean(final_eval)  # every rank evaluates the same weights; the mean keeps them equal
        state["eval_losses"].append([total, final_eval])
    module.eval()
    seconds = time.perf_counter() - start
    metrics: dict[str, Any] = {"train_loss": round(state["losses"][-1], 6), "steps": total,
                               "tokens": state["tokens"], "seconds": round(seconds, 3),
                               "tokens_per_second": round(state["tokens"] / max(seconds, 1e-9), 1)}
    if final_eval is not None:
        metrics["eval_loss"] = round(final_eval, 6)
    if "eval_accuracy" in final:
        metrics["eval_accuracy"] = round(ctx.mean(final["eval_accuracy"]), 6)
    version = None
    if out_dir is not None:
        from .bundle import save

        if ckpt is not None and save_every:
            on_main(ctx, save_checkpoint, ckpt, module, opt, state)
        version = ctx.broadcast_str(on_main(ctx, _save_bundle, save, module, out_dir, metrics, name))
    return TrainResult(out_dir, metrics, list(state["losses"]),
                       [(int(s), float(v)) for s, v in state["eval_losses"]], module, version)


def _save_bundle(save: Callable[..., Path], module: nn.Module, out_dir: Path, metrics: dict[str, Any],
                 name: str | None) -> str | None:
    """Write the bundle files into ``out_dir`` next to ``checkpoint/`` (``save`` replaces its directory);
    with ``name``, store the bundle (without the checkpoint) and return its ``name@vK``."""
    import os
    import tempfile

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        bundle = save(module, Path(tmp) / "bundle", metrics=metrics)
        version = None
        if name is not None:
            from .store import Store

            version = Store().save(bundle, name).ref
        for f in bundle.iterdir():
            os.replace(f, out_dir / f.name)
    return version


def _progress(console: Any, total: int) -> Any:
    if console is None:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("[bold]train[/bold]"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TimeElapsedColumn(), console=console)
    bar.start()
    return bar
