"""``adapterhub compose`` (several adapters → one) and ``adapterhub merge`` (adapter → full model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from adapterhub.registry import AdapterhubError

from .cli import CONTEXT, MODEL_HELP
from .report import make_console


def add_commands(cli: click.Group) -> None:
    """Add ``compose`` and ``merge`` to the ``adapterhub`` group."""
    cli.add_command(compose_cmd)
    cli.add_command(merge_cmd)


def _weights(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise click.BadParameter(f"expected numbers separated by commas, got {text!r}",
                                 param_hint="--weights") from None
    if len(weights) != n:
        raise click.BadParameter(f"{len(weights)} weights for {n} adapters", param_hint="--weights")
    return weights


def _param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"expected KEY=VALUE, got {text!r}", param_hint="--param")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def _error(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"


@click.command("compose", context_settings=CONTEXT)
@click.argument("sources", nargs=-1, required=True)
@click.option("--method", default="linear", show_default=True,
              help="merge method (a register_merge_methods plugin): linear = exact sum_i w_i dW_i; cat = concatenated "
                   "LoRA factors (exact, rank sum r_i); svd = the sum truncated to --rank; ties = trim to --density, "
                   "elect signs, disjoint mean; dare_linear = random drop to --density, rescale, sum; dare_ties = "
                   "DARE then TIES. `adapterhub plugins` lists the installed ones")
@click.option("--weights", "-w", default=None, help="one weight per adapter, comma-separated (default: all 1)")
@click.option("--rank", "-r", type=click.IntRange(min=1), default=None,
              help="rank of the composed LoRA (and svd's rank). Default: sum of the inputs' ranks for linear/cat "
                   "(exact), else the largest input rank")
@click.option("--density", "-d", type=float, default=None,
              help="ties/dare: fraction of each delta's entries kept (ties default 0.2, dare 0.5)")
@click.option("--seed", type=int, default=None, help="dare: seed of the random masks (default 0)")
@click.option("--param", "-p", "extra", multiple=True, metavar="KEY=VALUE",
              help="another parameter of the merge method (repeatable)")
@click.option("--model", "-m", default=None,
              help=MODEL_HELP + ". Default: the bundles' base model when it is a built-in name or a local directory.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="bundle directory to write (replaced atomically if it exists)")
@click.option("--force", is_flag=True, help="use adapters even if they were made for another base model than --model")
@click.option("--json", "as_json", is_flag=True, help="print the per-module report as JSON (for scripts)")
def compose_cmd(sources: tuple[str, ...], method: str, weights: str | None, rank: int | None, density: float | None,
                seed: int | None, extra: tuple[str, ...], model: str | None, out: Path, force: bool,
                as_json: bool) -> None:
    """Combine the adapters SOURCES (bundle directories, stored versions such as name@v3,
    hf://org/name@v2, PEFT directories) into one LoRA bundle in OUT.

    \b
    Works across variants through their weight deltas: per module
        dW = method([dW_i], [w_i])      (modules in only some adapters: those present)
    then dW is written as a LoRA B A (truncated SVD, B = U sqrt(S), A = sqrt(S) V^T) and the
    relative error |dW - BA|_F / |dW|_F is reported per module. linear (the exact weighted sum,
    unlike PEFT's linear, which mixes A and B and adds cross terms) and cat are exact at their
    default rank. Modules whose bias changes (IA3 on a biased layer, GLoRA) are written as
    glora(b=lora, e=vector). Adapters that cannot be merged (bottleneck, prefix, prompt) are refused.
    """
    from .composition import compose

    params: dict[str, Any] = dict(_param(p) for p in extra)
    if density is not None:
        params["density"] = density
    if seed is not None:
        params["seed"] = seed
    report = compose(list(sources), out, method=method, weights=_weights(weights, len(sources)), rank=rank,
                     params=params, model=model, check_base=not force)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"compose --method {method} -> {out}", title_justify="left")
    for col, justify in (("module", "left"), ("inputs", "left"), ("out x in", "right"), ("rank", "right"),
                         ("rel. error", "right"), ("bias", "left")):
        table.add_column(col, justify=justify)
    for m in report.modules:
        inputs = ", ".join(f"{i}:{v}" for i, v in zip(m.inputs, m.variants, strict=True))
        table.add_row(m.module, inputs, f"{m.out_features}x{m.in_features}", str(m.rank), _error(m.rel_error),
                      "yes" if m.bias else "")
    console = make_console()
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    click.echo(f"wrote {out}: {len(report.modules)} modules, largest relative error {_error(report.max_error)}")


@click.command("merge", context_settings=CONTEXT)
@click.argument("adapter")
@click.option("--model", "-m", required=True, help=MODEL_HELP + " (its safetensors are read one tensor at a time).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory for the merged model (safetensors shards + index + config + tokenizer files)")
@click.option("--quant-base", type=click.Choice(["original", "dequantized"]), default="original", show_default=True,
              help="for adapters on a quantized base (on nf4, ...): add dW to the checkpoint's full-precision "
                   "weights (original), or to their dequantized form (dequantized: the adapted model's exact "
                   "function). LoftQ/LQ-LoRA always use their own dequantized base")
@click.option("--overwrite", is_flag=True, help="write into a non-empty OUT (its files of the same names are replaced)")
@click.option("--force", is_flag=True, help="merge even if ADAPTER was made for another base model")
@click.option("--no-progress", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (for scripts)")
def merge_cmd(adapter: str, model: str, out: Path, quant_base: str, overwrite: bool, force: bool, no_progress: bool,
              as_json: bool) -> None:
    """Merge ADAPTER (a bundle directory, name@v3, hf://org/name@v2 or a PEFT directory) into
    MODEL and write the full model to OUT, which transformers' from_pretrained loads.

    \b
    Reads and writes tensor by tensor (never the whole model in memory): each adapted weight
    becomes W0 + dW (dW = the variant's delta_weight(), and its delta_bias()), train modules take
    the bundle's tensors, everything else is copied. Shards are staged, fsynced and renamed into
    OUT; the index is written last.
    """
    from .merge_stream import merge_checkpoint

    if quant_base not in ("original", "dequantized"):  # pragma: no cover - click checks it
        raise AdapterhubError(f"--quant-base must be original or dequantized, got {quant_base}")
    report = merge_checkpoint(model, adapter, out, check_base=not force, quant_base=quant_base,  # type: ignore[arg-type]
                              overwrite=overwrite, progress=not no_progress and not as_json)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    from .report import human_bytes

    console = make_console()
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    biggest = max(report.modules, key=lambda m: m.relative_change, default=None)
    change = f"; largest |dW|/|W| {biggest.relative_change:.3g} at '{biggest.module}'" if biggest else ""
    click.echo(f"wrote {out}: {len(report.modules)} merged modules, {len(report.replaced)} replaced tensors, "
               f"{report.tensors} tensors in {len(report.files)} files ({human_bytes(report.bytes)}; largest tensor "
               f"{human_bytes(report.largest_tensor_bytes)}){change}")
