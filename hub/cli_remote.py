"""Hub commands: ``push`` (store versions to a Hugging Face Hub repository) and ``pull`` (back into the
store). The protocol -- one commit + one tag ``vK`` per version, retries, what a failure leaves -- is
described in :mod:`adapterhub.remote`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import CONTEXT, MODEL_HELP

HOME_HELP = "the store directory (default: $ADAPTERHUB_HOME, else <user cache dir>/adapterhub)"
RETRIES_HELP = ("attempts per Hub request on connection errors, timeouts, HTTP 5xx and 429, waiting 1s, 2s, 4s, ... "
                "in between; other errors (401, 403, 404, ...) are not retried")
TOKEN_NOTE = ("The token comes from the usual Hugging Face settings (HF_TOKEN, else the one `hf auth login` "
              "saved) and is never printed; HF_ENDPOINT selects another Hub.")


def add_commands(cli: click.Group) -> None:
    """Add ``push`` and ``pull`` to the ``adapterhub`` group."""
    cli.add_command(push_cmd)
    cli.add_command(pull_cmd)


def _progress():
    """A callback printing one line per step on stderr (stdout stays for results and --json)."""
    from rich.console import Console
    from rich.text import Text

    console = Console(stderr=True, highlight=False)
    return lambda line: console.print(Text(line, style="dim"), soft_wrap=True)  # Text: "[...]" is not markup


def _store(home: Path | None):
    from .store import Store

    return Store(home)


def _policy(retries: int):
    from .remote_retry import RetryPolicy

    return RetryPolicy(attempts=retries)


@click.command("push", context_settings=CONTEXT, epilog=TOKEN_NOTE)
@click.argument("ref")
@click.option("--repo", "-r", "repo_id", required=True, metavar="ORG/NAME",
              help="the Hub model repository (created if it does not exist)")
@click.option("--private", is_flag=True, help="create the repository as private (if it does not exist yet)")
@click.option("--retries", type=click.IntRange(min=1), default=4, show_default=True, help=RETRIES_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON (for scripts)")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None, help=HOME_HELP)
def push_cmd(ref: str, repo_id: str, private: bool, retries: int, as_json: bool, home: Path | None) -> None:
    """Push stored versions to a Hugging Face Hub repository: each version becomes one commit on
    main (its bundle files, README.md replaced by a model card with base_model, library_name, tags,
    spec and metrics) tagged vK.

    \b
    REF:  name@v3, name@tag, name@sha256:<prefix>   that one version
          name                                      every version of name not on the Hub yet, oldest first

    A version whose tag is already on the Hub with the same files is skipped, so pushing again is
    safe. A version counts as pushed only once its tag exists: if a push fails half-way, the Hub has
    no tag for it, and running the push again completes it (an already uploaded commit is tagged,
    not uploaded twice). Pull a version back with `adapterhub pull ORG/NAME@vK`, or load it with
    adapterhub.load(model, "hf://ORG/NAME@vK")."""
    from .remote import push

    results = push(ref, repo_id, store=_store(home), private=private or None, retry=_policy(retries),
                   notify=None if as_json else _progress())
    if as_json:
        click.echo(json.dumps([r.to_json() for r in results], indent=2))
        return
    if not results:
        click.echo(f"nothing to push: {ref} has no versions")
    for r in results:
        what = {"pushed": "pushed", "tagged": "tagged (already uploaded)",
                "already-pushed": "already on the Hub"}[r.status]
        click.echo(f"{r.ref} -> hf://{r.repo_id}@{r.tag}  {what}, commit {r.commit[:10]}")


@click.command("pull", context_settings=CONTEXT, epilog=TOKEN_NOTE)
@click.argument("source", metavar="ORG/NAME[@REV]")
@click.option("--name", "-n", help="the local name to save it under (default: the repository's name)")
@click.option("--model", "-m", default=None,
              help=MODEL_HELP + ". Needed only for a plain PEFT repository (adapter_config.json, no "
                   "adapterhub.json), which is converted into a bundle on that model; default: the "
                   "base_model_name_or_path of its config.")
@click.option("--retries", type=click.IntRange(min=1), default=4, show_default=True, help=RETRIES_HELP)
@click.option("--json", "as_json", is_flag=True, help="print the new version as JSON (for scripts)")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None, help=HOME_HELP)
def pull_cmd(source: str, name: str | None, model: str | None, retries: int, as_json: bool,
             home: Path | None) -> None:
    """Download a version from a Hugging Face Hub repository and save it in the local store as the
    next version of NAME; its message records the repository, revision and commit.

    \b
    ORG/NAME@v2      the version tagged v2 (also: any tag, a branch, a commit id)
    ORG/NAME         the highest vK tag (main if the repository has no vK tag)
    hf://ORG/NAME@v2 the same

    Pulling content identical to NAME's latest version adds no version (that one is printed).
    The download goes through a temporary directory; the store only sees a complete bundle."""
    from .remote import pull

    result = pull(source, name=name, store=_store(home), model=model, retry=_policy(retries),
                  notify=None if as_json else _progress())
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
        return
    click.echo(result.version.ref)
    if not result.new:
        click.echo(f"unchanged: the content equals {result.version.ref}; no version added", err=True)
