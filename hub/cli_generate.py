"""``adapterhub generate``: complete prompts with a model and LoRA adapters, all prompts in one mixed batch."""

from __future__ import annotations

import json
from typing import Any

import click

from adapterhub.registry import AdapterhubError

from .cli import CONTEXT, MODEL_HELP
from .report import make_console

NO_ADAPTER = "-"


def add_commands(cli: click.Group) -> None:
    """Add ``generate`` to the ``adapterhub`` group."""
    cli.add_command(generate_cmd)


def _per_prompt(adapters: tuple[str, ...], n_prompts: int) -> list[str | None]:
    """The adapter source of every prompt: none, one for all, or one per prompt (``-``: the base model)."""
    if not adapters:
        return [None] * n_prompts
    if len(adapters) == 1:
        adapters = adapters * n_prompts
    if len(adapters) != n_prompts:
        raise AdapterhubError(f"{len(adapters)} --adapter options for {n_prompts} prompts: give one --adapter for "
                              "all prompts, or one per prompt (in order; '-' for the base model)")
    return [None if a == NO_ADAPTER else a for a in adapters]


@click.command("generate", context_settings=CONTEXT)
@click.argument("prompts", nargs=-1, required=True)
@click.option("--model", "-m", required=True, help=MODEL_HELP + ".")
@click.option("--adapter", "-a", "adapters", multiple=True,
              help="a LoRA adapter: a store reference (NAME, NAME@v2, NAME@tag) or a bundle directory (adapterhub or "
                   "PEFT format). Once for all prompts, or once per prompt in order ('-': no adapter for that prompt)")
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=32, show_default=True,
              help="tokens to generate per prompt (fewer when the end-of-sequence token comes first)")
@click.option("--temperature", "-t", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="0: greedy; above 0: sample from softmax(logits / temperature)")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="sample only from the most likely tokens holding this much probability")
@click.option("--seed", type=int, default=None,
              help="sampling seed (prompt i uses SEED + i); the same seed gives the same text whatever the batch")
@click.option("--json", "as_json", is_flag=True,
              help="print a JSON list: prompt, adapter, completion, token ids, finish reason (for scripts)")
def generate_cmd(prompts: tuple[str, ...], model: str, adapters: tuple[str, ...], max_new_tokens: int,
                 temperature: float, top_p: float, seed: int | None, as_json: bool) -> None:
    """Complete each PROMPT with MODEL, each prompt with its own adapter, all in one batch.

    \b
    adapterhub generate -m tiny-llama --adapter medical@v2 "The patient"
    adapterhub generate -m tiny-llama -a medical@v2 -a legal -a - "Q1" "Q2" "Q3"
    adapterhub generate -m ./my-model -a ./bundle --temperature 0.8 --seed 1 --json "Once upon"

    The adapters must be LoRA (`adapterhub export --to peft` converts other variants); they are loaded into an
    adapter pool and every row of the batch uses its own (S-LoRA style), with a key/value cache.
    """
    from .generation import GenerationEngine
    from .models import load_model
    from .text_codec import text_codec

    sources = _per_prompt(adapters, len(prompts))
    codec = text_codec(model)
    m = load_model(model)
    pool, names = _load_pool(m, sources)
    engine = GenerationEngine(m, pool, max_batch=len(prompts), eos_id=codec.eos_id)
    requests = []
    for i, (text, src) in enumerate(zip(prompts, sources)):
        ids = codec.encode(text)
        if not ids:
            raise AdapterhubError(f"prompt {i + 1} is empty after tokenization")
        requests.append(engine.submit(ids, adapter=None if src is None else names[src],
                                      max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      seed=None if seed is None else seed + i))
    console = make_console()
    if as_json:
        engine.run_until_done()
    else:
        with console.status(f"generating {len(prompts)} completion(s) ...", spinner="dots"):
            engine.run_until_done()
    failed = [r for r in requests if r.finish_reason == "error"]
    if failed:
        raise AdapterhubError(f"generation failed: {failed[0].error}")
    results = [{"prompt": text, "adapter": src, "completion": codec.decode(r.output_ids), "token_ids": r.output_ids,
                "finish_reason": r.finish_reason} for text, src, r in zip(prompts, sources, requests)]
    if as_json:
        click.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    _print_results(console, results)


def _load_pool(model, sources: list[str | None]) -> tuple[Any, dict[str, str]]:
    """A pool holding every distinct adapter source (None when there is none), and each source's name in it."""
    distinct = list(dict.fromkeys(s for s in sources if s is not None))
    if not distinct:
        return None, {}
    from .adapter_pool import AdapterPool

    pool = AdapterPool(model, max_resident=len(distinct))
    return pool, {src: pool.add(src) for src in distinct}


def _print_results(console, results: list[dict[str, Any]]) -> None:
    from rich.text import Text

    for i, r in enumerate(results):
        head = Text(f"[{i + 1}] ", style="bold")
        head.append(f"adapter {r['adapter']}" if r["adapter"] else "base model", style="cyan")
        head.append(f"  ({len(r['token_ids'])} tokens, {r['finish_reason']})", style="dim")
        console.print(head)
        body = Text(r["prompt"], style="bold")
        body.append(r["completion"])
        console.print(body)
        if i + 1 < len(results):
            console.print()
