"""The ``adapterhub`` command line. Plugins add commands through the ``register_commands`` hook."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from adapterhub.registry import AdapterhubError

from .report import make_console

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Group(click.Group):
    """A click group that turns adapterhub's errors into a message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except AdapterhubError as exc:
            from .train_dist import is_main_process

            if is_main_process():  # under torchrun every rank fails alike: say it once
                click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


MODEL_HELP = ("a built-in model (tiny-llama, tiny-gpt2, tiny-bert), a local Hugging Face-format "
              "directory, or a Hub id in the local Hugging Face cache")


@click.group(cls=Group, context_settings=CONTEXT)
@click.version_option(package_name="adapterhub", prog_name="adapterhub")
def cli() -> None:
    """adapterhub: parameter-efficient fine-tuning from a readable .surgery spec.

    \b
    A .surgery file says which layers get which adapter and quantization:
        attn.* -> lora(r=8, alpha=16) on nf4
        mlp.*  -> lora(r=4)
        lm_head -> skip
    Start with `adapterhub quickstart`; the language is in docs/surgery.md.
    """


@cli.command("plan", context_settings=CONTEXT)
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", required=True, help=MODEL_HELP + ". Weights are never loaded.")
@click.option("--json", "as_json", is_flag=True, help="print the plan as JSON (for scripts)")
@click.option("--full", is_flag=True, help="one row per module instead of per-layer groups")
def plan_cmd(spec: Path, model: str, as_json: bool, full: bool) -> None:
    """Show what SPEC does to MODEL: per module the variant and its parameters, the quantization,
    the trainable parameters and the rule (line) that won, with totals."""
    from .planning import plan
    from .report import print_plan

    p = plan(model, _read_spec(spec))
    if as_json:
        click.echo(json.dumps(p.to_json(), indent=2))
        return
    print_plan(p, full=full)


def _read_spec(path: Path):
    from adapterhub.dsl import parse_file

    return parse_file(path)


@cli.command("apply", context_settings=CONTEXT)
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "-m", required=True, help=MODEL_HELP + ".")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="bundle directory to write (replaced atomically if it exists)")
@click.option("--seed", default=0, show_default=True, help="seed for adapter initialisation")
@click.option("--json", "as_json", is_flag=True, help="print a JSON summary instead of the table")
def apply_cmd(spec: Path, model: str, out: Path, seed: int, as_json: bool) -> None:
    """Apply SPEC to MODEL and write the initialised adapters to OUT as a bundle
    (adapter_model.safetensors + adapterhub.json + README.md). Prints the plan, then the weight
    memory measured from the model's tensors (quantized layers: codes + scales + code tables)."""
    from .bundle import save
    from .kbit import format_quant_memory, quant_memory
    from .models import load_model
    from .report import print_plan
    from .surgery import applied, apply

    parsed = _read_spec(spec)
    m = load_model(model, seed=0)
    apply(m, parsed, seed=seed)
    save(m, out)
    p = applied(m).plan
    measured = quant_memory(m)
    if as_json:
        click.echo(json.dumps({"bundle": str(out), **p.summary(), "measured": measured}, indent=2))
        return
    print_plan(p)
    click.echo(format_quant_memory(measured, p.bytes_after))
    click.echo(f"wrote bundle {out}")


@cli.command("plugins", context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="print as JSON (for scripts)")
def plugins_cmd(as_json: bool) -> None:
    """List the installed variants, quantizers, merge methods and role aliases, each with the
    plugin that registered it, its parameters and defaults."""
    from .plugin_list import plugin_listing, print_plugins

    listing = plugin_listing()
    if as_json:
        click.echo(json.dumps(listing, indent=2, default=str))
    else:
        print_plugins(listing, make_console())


@cli.command("quickstart", context_settings=CONTEXT)
@click.option("--model", "-m", default="tiny-llama", show_default=True, help=MODEL_HELP + ".")
@click.option("--out", "-o", default="adapterhub-quickstart", show_default=True,
              type=click.Path(file_okay=False, path_type=Path), help="where to write the trained bundle")
@click.option("--steps", default=30, show_default=True, help="training steps")
@click.option("--seed", default=0, show_default=True)
def quickstart_cmd(model: str, out: Path, steps: int, seed: int) -> None:
    """The whole loop on built-in defaults: plan a spec (LoRA on attention, QLoRA-style LoRA on
    an NF4 MLP), apply it, train a few steps on built-in text, save the bundle, reload it and
    check the reloaded model gives the same outputs."""
    from .quickstart import run_quickstart

    run_quickstart(model, out, steps, seed, make_console())


def build_cli() -> click.Group:
    """The CLI with plugin commands added (``register_commands`` hook)."""
    from adapterhub.registry import get_registry

    reg = get_registry()
    reg.pm.hook.register_commands(cli=cli)
    return cli


def main(argv: list[str] | None = None) -> None:
    try:
        group = build_cli()
    except AdapterhubError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    group.main(args=argv, prog_name="adapterhub")


from .cli_store import add_commands as _add_store  # noqa: E402

_add_store(cli)

from .cli_peft import add_commands as _add_peft  # noqa: E402

_add_peft(cli)

from .cli_remote import add_commands as _add_remote  # noqa: E402

_add_remote(cli)

from .cli_compose import add_commands as _add_compose  # noqa: E402

_add_compose(cli)

from .cli_train import add_commands as _add_train  # noqa: E402

_add_train(cli)

from .cli_generate import add_commands as _add_generate  # noqa: E402

_add_generate(cli)

from .cli_serve import add_commands as _add_serve  # noqa: E402

_add_serve(cli)
