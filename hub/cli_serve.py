"""``adapterhub serve``: the OpenAI-style HTTP server over one model and many adapters (adapterhub.server)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import click

from .cli import CONTEXT, MODEL_HELP
from .report import make_console

ADAPTERS_HELP = """an adapter source; repeat for several:
'store' = every name in the local store (its latest version as NAME@vK, also addressable as NAME and by its
tags; older versions that carry a tag too); a store reference (NAME, NAME@v2, NAME@prod -> loaded as NAME@vK,
also addressable as written); a bundle directory (named by the directory); a directory of bundle directories
(each named by its sub-directory); a store directory (one holding index.sqlite: like 'store');
hf://org/repo[@rev]"""


def _serve_options(f):
    options = [
        click.option("--model", "-m", required=True, help=MODEL_HELP + "."),
        click.option("--adapters", "-a", "adapters", multiple=True, metavar="SRC", help=ADAPTERS_HELP),
        click.option("--port", "-p", default=8000, show_default=True, type=click.IntRange(0, 65535),
                     help="TCP port (0: any free port; the URL is printed)"),
        click.option("--host", default="127.0.0.1", show_default=True,
                     help="address to listen on (0.0.0.0: every interface -- there is no authentication)"),
        click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1),
                     help="requests decoded together at most (continuous batching)"),
        click.option("--max-resident", default=64, show_default=True, type=click.IntRange(1),
                     help="adapters on the compute device at once (the rest wait in host memory, paged LRU)"),
        click.option("--max-seq-len", type=click.IntRange(2), default=None,
                     help="prompt + max_tokens limit per request (default: the model's position limit)"),
        click.option("--max-rank", type=click.IntRange(1), default=None,
                     help="refuse adapters of a higher LoRA rank (default: no limit)"),
        click.option("--device", default=None, help="torch device (default: cuda when available, else cpu)"),
        click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="the store for store references and 'store' (default: $ADAPTERHUB_HOME, else the "
                          "user cache dir)"),
        click.option("--request-timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
                     help="seconds a completion may take before it is cancelled (504)"),
        click.option("--quiet", "-q", is_flag=True, help="no per-request log lines on stderr"),
        click.option("--json", "as_json", is_flag=True,
                     help="print the start-up summary as one JSON line (url, model, adapters) for scripts"),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command("serve", context_settings=CONTEXT)
@_serve_options
def serve_cmd(model: str, adapters: tuple[str, ...], port: int, host: str, max_batch: int, max_resident: int,
              max_seq_len: int | None, max_rank: int | None, device: str | None, home: Path | None,
              request_timeout: float, quiet: bool, as_json: bool) -> None:
    """Serve MODEL and its adapters over HTTP with an OpenAI-style API; each request picks an adapter by name.

    \b
    Endpoints:
      GET    /v1/models               the base model and every loaded adapter (and alias)
      POST   /v1/completions          {"model": "medical@v2", "prompt": "...", "max_tokens": 32,
                                       "temperature": 0, "top_p": 1, "seed": 1, "stop": ["\\n"]}
      GET    /v1/adapters             loaded adapters and pool statistics
      POST   /v1/adapters             {"source": "legal@v3", "name": "legal"}: load one at runtime
      DELETE /v1/adapters/NAME        unload: new requests for it get 404 at once; those running finish first
      GET    /health                  status and batching statistics
    "model" is an adapter name or alias from /v1/models, or MODEL itself for the base model; "temperature"
    defaults to 1 as in OpenAI's API (0: greedy); "return_token_ids": true adds each choice's token ids.
    Concurrent requests are decoded together in one batch whatever their adapters (continuous batching).
    Errors are JSON {"error": {"message", "type", "code", "param"}} with 4xx/5xx. Ctrl-C (or SIGTERM) stops
    taking requests, lets the running ones finish (10 s at most) and exits.

    \b
    Example:
      adapterhub serve --model tiny-llama --adapters store --port 8000
      curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
           -d '{"model": "medical", "prompt": "Hello", "max_tokens": 16, "temperature": 0}'
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .server import create_server

    console = make_console()
    err = make_console(stderr=True)
    with Progress(TextColumn("loading {task.description}"), BarColumn(), MofNCompleteColumn(), console=err,
                  transient=True, disable=as_json) as bar:
        tasks: dict[str, int] = {}

        def progress(spec: str, item, i: int, n: int) -> None:
            if spec not in tasks:
                tasks[spec] = bar.add_task(spec, total=n)
            bar.update(tasks[spec], completed=i)

        server = create_server(model, adapters, host=host, port=port, max_batch=max_batch,
                               max_resident=max_resident, max_seq_len=max_seq_len, max_rank=max_rank,
                               device=device, home=home, quiet=quiet, request_timeout=request_timeout,
                               progress=progress)
    listing = server.get_adapters()["data"]
    if as_json:
        click.echo(json.dumps({"url": server.url, "model": model, "max_seq_len": server.max_seq_len,
                               "adapters": [{"id": a["id"], "aliases": a["aliases"], "source": a["source"]}
                                            for a in listing]}), nl=True)
    else:
        _print_summary(console, server, model, listing)
    click.get_text_stream("stdout").flush()

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        err.print("stopping: finishing the requests in flight ...")
        server.shutdown(grace=10.0)
    err.print("stopped")


def _print_summary(console, server, model: str, listing: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=f"adapterhub serve: {model} at {server.url}", title_justify="left")
    table.add_column("model / adapter (use as \"model\")")
    table.add_column("also addressable as")
    table.add_column("source", overflow="fold")
    table.add_row(model, "", "base model (no adapter)")
    for a in listing:
        table.add_row(a["id"], ", ".join(a["aliases"]), a["source"])
    console.print(table)
    console.print(f"listening on {server.url} (max_seq_len {server.max_seq_len}); "
                  f"try: curl -s {server.url}/v1/models ; Ctrl-C stops")


def add_commands(cli: click.Group) -> None:
    cli.add_command(serve_cmd)
