"""``adapterhub export``: a mergeable adapter as a plain PEFT LoRA (see :mod:`adapterhub.export`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import CONTEXT, MODEL_HELP
from .report import make_console


def add_commands(cli: click.Group) -> None:
    """Add ``export`` to the ``adapterhub`` group."""
    cli.add_command(export_cmd)


@click.command("export", context_settings=CONTEXT)
@click.argument("src")
@click.option("--to", "target", type=click.Choice(["peft"]), default="peft", show_default=True,
              help="output format: peft = a plain LoRA (adapter_config.json + adapter_model.safetensors) that "
                   "PEFT, transformers, vLLM and LoRAX load")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory to write (replaced atomically if it exists)")
@click.option("--rank", "-r", type=click.IntRange(min=1), default=None,
              help="LoRA rank of every module (default: each layer's own rank, 16 for variants without one)")
@click.option("--model", "-m", default=None,
              help=MODEL_HELP + ". Default: the bundle's base model when it is a built-in name or a local directory.")
@click.option("--force", is_flag=True, help="load SRC even if it was made for another base model")
@click.option("--json", "as_json", is_flag=True, help="print the per-module report as JSON (for scripts)")
def export_cmd(src: str, target: str, out: Path, rank: int | None, model: str | None, force: bool,
               as_json: bool) -> None:
    """Convert the adapter SRC (a bundle directory, a stored version such as name@v3, or
    hf://org/name@v2) into a plain LoRA in OUT, so any PEFT-speaking server can serve GLoRA,
    Tied-LoRA, VeRA, DoRA, IA3, ... adapters.

    \b
    Each module's weight update dW is factorised by a truncated SVD:
        dW = U S V^T,  B = U_r sqrt(S_r),  A = sqrt(S_r) V_r^T,  lora_alpha = r
    and the relative error |dW - BA|_F / |dW|_F is reported per module (0 at full rank).
    Variants that also change a bias (IA3 on a biased layer, GLoRA) are written with PEFT's
    lora_bias=true, so the bias is exact too. Adapters that cannot be merged (prefix, prompt,
    bottleneck) are refused.
    """
    from .export import export_peft, format_error

    report = export_peft(src, out, model=model, rank=rank, check_base=not force)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    from rich.table import Table

    table = Table(title=f"export {src} -> {out} (PEFT LoRA)", title_justify="left")
    for col, justify in (("module", "left"), ("variant", "left"), ("out x in", "right"), ("rank", "right"),
                         ("rel. error", "right"), ("bias delta", "right")):
        table.add_column(col, justify=justify)
    for m in report.modules:
        table.add_row(m.module, m.variant, f"{m.out_features}x{m.in_features}", str(m.rank),
                      format_error(m.rel_error), "" if m.bias_norm is None else f"{m.bias_norm:.3g}")
    console = make_console()
    console.print(table)
    for note in report.notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False)
    click.echo(f"wrote {out}: {len(report.modules)} LoRA modules, largest relative error "
               f"{format_error(report.max_error)}" + (", lora_bias=true" if report.lora_bias else ""))
