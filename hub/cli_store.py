"""Store commands: ``save``, ``versions``, ``show``, ``diff``, ``tag``, ``rm``, ``fsck``.

Every command works on the store under ``--home``, else ``$ADAPTERHUB_HOME``, else the user cache dir.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .cli import CONTEXT
from .report import human_bytes, make_console

HOME_HELP = "the store directory (default: $ADAPTERHUB_HOME, else <user cache dir>/adapterhub)"


def _home_option(f: Callable) -> Callable:
    return click.option("--home", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help=HOME_HELP)(f)


def _json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="print JSON (for scripts)")(f)


def _store(home: Path | None):
    from .store import Store

    return Store(home)


def _metrics(m: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items())


def _date(iso: str) -> str:
    return iso.replace("T", " ")[:16]


def _manifest(store, v) -> dict[str, Any]:
    return json.loads(store.read_bytes(v, "adapterhub.json"))


@click.command("save", context_settings=CONTEXT)
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--name", "-n", required=True, help="the adapter's name in the store: letters, digits, . _ -")
@click.option("--tag", "-t", help="also point this tag at the new version (a tag moves; not 'v<number>')")
@click.option("--message", "-m", help="a note kept with the version")
@click.option("--parent", help="the version this one derives from (default: the bundle manifest's parent)")
@_json_option
@_home_option
def save_cmd(directory: Path, name: str, tag: str | None, message: str | None, parent: str | None,
             as_json: bool, home: Path | None) -> None:
    """Store the bundle DIRECTORY as the next version of NAME and print its reference (NAME@vK).

    Every file of the bundle is kept, content-addressed; the version is immutable. Saving content
    identical to NAME's latest version adds no version (that one is printed)."""
    store = _store(home)
    before = {v.ref for v in store.versions(name)} if name in store.names() else set()
    v = store.save(directory, name, tag=tag, message=message, parent=parent)
    if as_json:
        click.echo(json.dumps({**v.to_json(), "new": v.ref not in before}, indent=2))
        return
    click.echo(v.ref)
    if v.ref in before:
        click.echo(f"unchanged: the content equals {v.ref}; no version added", err=True)


@click.command("versions", context_settings=CONTEXT)
@click.argument("name", required=False)
@_json_option
@_home_option
def versions_cmd(name: str | None, as_json: bool, home: Path | None) -> None:
    """List the versions of NAME: number, tags, date, base model, parent, size, metrics.
    Without NAME, list the names in the store."""
    from rich.table import Table

    store = _store(home)
    console = make_console()
    if name is None:
        listing = {n: store.versions(n) for n in store.names()}
        if as_json:
            click.echo(json.dumps([{"name": n, "versions": len(vs), "latest": vs[-1].ref} for n, vs in listing.items()],
                                  indent=2))
            return
        if not listing:
            click.echo(f"the store {store.home} is empty (add a bundle with `adapterhub save DIR --name NAME`)")
            return
        table = Table(title=f"adapters in {store.home}", title_justify="left")
        for col in ("name", "versions", "latest", "date", "base"):
            table.add_column(col)
        for n, vs in listing.items():
            table.add_row(n, str(len(vs)), vs[-1].ref, _date(vs[-1].created), vs[-1].base_model or "")
        console.print(table)
        return
    vs = store.versions(name)
    if as_json:
        click.echo(json.dumps([v.to_json() for v in vs], indent=2))
        return
    table = Table(title=f"{name}: {len(vs)} version(s)", title_justify="left")
    for col, justify in (("version", "left"), ("tags", "left"), ("date (UTC)", "left"), ("base", "left"),
                         ("parent", "left"), ("size", "right"), ("metrics", "left")):
        table.add_column(col, justify=justify)
    for v in vs:
        table.add_row(f"v{v.number}", ", ".join(v.tags), _date(v.created), v.base_model or "", v.parent or "",
                      human_bytes(v.size), _metrics(v.metrics))
    console.print(table)


@click.command("show", context_settings=CONTEXT)
@click.argument("ref")
@_json_option
@_home_option
def show_cmd(ref: str, as_json: bool, home: Path | None) -> None:
    """Show one version: its manifest summary (base model, parent, metrics, modules), its files and
    its spec text. REF: name (latest), name@v3, name@tag or name@sha256:<prefix>."""
    from rich.table import Table

    store = _store(home)
    v = store.resolve(ref)
    m = _manifest(store, v)
    if as_json:
        click.echo(json.dumps({**v.to_json(), "manifest": m}, indent=2, default=str))
        return
    modules = m.get("modules") or {}
    by_variant: dict[str, int] = {}
    for entry in modules.values():
        key = entry.get("variant") or entry.get("action") or "?"
        by_variant[key] = by_variant.get(key, 0) + 1
    console = make_console()
    rows = [("version", v.ref), ("digest", v.digest), ("tags", ", ".join(v.tags) or "-"),
            ("created", f"{_date(v.created)} UTC"), ("base model", v.base_model or "-"),
            ("base fingerprint", v.base_fingerprint or "-"), ("parent", v.parent or "-"),
            ("message", v.message or "-"), ("metrics", _metrics(v.metrics) or "-"),
            ("modules", ", ".join(f"{k} x{n}" for k, n in sorted(by_variant.items())) or "-"),
            ("trainable params", f"{m['trainable_params']:,}" if "trainable_params" in m else "-"),
            ("size", human_bytes(v.size))]
    for key, value in rows:
        console.print(f"[bold]{key:>16}[/bold]  {value}", highlight=False)
    table = Table(title="files", title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    table.add_column("blob")
    for filename, digest in v.files.items():
        table.add_row(filename, human_bytes(store.blob_path(digest).stat().st_size), digest[:19] + "…")
    console.print(table)
    console.print("[bold]spec[/bold]", highlight=False)
    console.print(m.get("spec", "").rstrip(), markup=False, highlight=False)


def _bundle(store, source: str) -> tuple[Path, str]:
    """A directory argument as itself, anything else as a store reference (checked out)."""
    path = Path(source)
    if path.is_dir():
        return path, source
    return store.checkout(source), store.resolve(source).ref


@click.command("diff", context_settings=CONTEXT)
@click.argument("a")
@click.argument("b")
@_json_option
@_home_option
def diff_cmd(a: str, b: str, as_json: bool, home: Path | None) -> None:
    """Compare two versions (store references or bundle directories), no base model needed: the
    unified diff of their spec texts, then per module the relative change of the weight update
    ||dW_B - dW_A|| / ||dW_A||. For LoRA-style adapters dW = s B A is computed from the saved factors
    (s = alpha/r, alpha/sqrt(r) with rslora, from the manifest); for other variants the module's own
    tensors are compared (method "tensors")."""
    from rich.table import Table

    from .store_diff import diff_bundles

    store = _store(home)
    (dir_a, label_a), (dir_b, label_b) = _bundle(store, a), _bundle(store, b)
    d = diff_bundles(dir_a, dir_b, label_a, label_b)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(d["spec_diff"] if d["spec_diff"] else f"specs are identical ({label_a}, {label_b})")
    if d["base_model"][0] != d["base_model"][1] or not d["same_base"]:
        click.echo(f"base model: {d['base_model'][0]} → {d['base_model'][1]}"
                   + ("" if d["same_base"] else " (different base fingerprints)"))
    for k, (x, y) in d["metrics"].items():
        click.echo(f"metric {k}: {x} → {y}")
    table = Table(title=f"per-module change ‖ΔW({label_b}) − ΔW({label_a})‖ / ‖ΔW({label_a})‖",
                  title_justify="left")
    for col, justify in (("module", "left"), ("variant", "left"), ("method", "left"), ("change", "right"),
                         ("note", "left")):
        table.add_column(col, justify=justify)
    for r in d["modules"]:
        change = "-" if r["change"] is None else f"{r['change']:.4g}"
        table.add_row(r["module"], r["variant"], r["method"], change, r["note"])
    console = make_console()
    console.print(table)
    methods = {r["method"] for r in d["modules"]}
    if "tensors" in methods:
        console.print("method 'tensors': ΔW needs the base weights for this variant, so the module's own "
                      "tensors are compared: sqrt(Σ‖t_B − t_A‖² / Σ‖t_A‖²)", highlight=False)


@click.command("tag", context_settings=CONTEXT)
@click.argument("ref")
@click.argument("tag")
@_home_option
def tag_cmd(ref: str, tag: str, home: Path | None) -> None:
    """Point TAG at the version REF names (a tag that pointed elsewhere moves). Afterwards NAME@TAG
    names that version. REF: name (latest), name@v3, name@tag or name@sha256:<prefix>."""
    from .store import StoreError

    store = _store(home)
    v = store.resolve(ref)
    try:
        old = store.resolve(f"{v.name}@{tag}").ref
    except StoreError:
        old = None
    store.tag(v.ref, tag)
    moved = f" (moved from {old})" if old and old != v.ref else ""
    click.echo(f"{v.name}@{tag} -> {v.ref}{moved}")


@click.command("rm", context_settings=CONTEXT)
@click.argument("ref")
@click.option("--yes", "-y", is_flag=True, help="do not ask for confirmation")
@_home_option
def rm_cmd(ref: str, yes: bool, home: Path | None) -> None:
    """Remove one version (and its tags) from the store; blobs no other version uses are deleted.
    Its number is never reused. Asks first unless --yes. REF: name@v3, name@tag, ... as for `show`."""
    store = _store(home)
    v = store.resolve(ref)
    tags = f", tags: {', '.join(v.tags)}" if v.tags else ""
    if not yes:
        click.confirm(f"remove {v.ref} ({human_bytes(v.size)}{tags})?", abort=True)
    store.rm(v.ref)
    click.echo(f"removed {v.ref}")


@click.command("fsck", context_settings=CONTEXT)
@click.option("--clean", is_flag=True, help="also delete left-overs of interrupted saves (temp files, "
              "unreferenced blobs); never touches versions")
@_json_option
@_home_option
def fsck_cmd(clean: bool, as_json: bool, home: Path | None) -> None:
    """Verify the store: the index's integrity, every blob's sha256, every version's files, digest and
    size, every tag. Nothing is repaired. Exits with status 1 if a problem is found."""
    store = _store(home)
    report = store.fsck_report(clean=clean)
    if as_json:
        click.echo(json.dumps({"home": str(store.home), "ok": not report.problems, "problems": report.problems,
                               "notes": report.notes, "versions": report.versions, "blobs": report.blobs,
                               "removed": report.removed}, indent=2))
    else:
        for p in report.problems:
            click.echo(f"problem: {p}")
        for n in report.notes:
            click.echo(f"note: {n}")
        if clean and report.removed:
            click.echo(f"removed {report.removed} left-over(s)")
        state = f"{len(report.problems)} problem(s)" if report.problems else "ok"
        click.echo(f"{store.home}: {report.versions} version(s), {report.blobs} blob(s): {state}")
    if report.problems:
        raise click.exceptions.Exit(1)


COMMANDS = (save_cmd, versions_cmd, show_cmd, diff_cmd, tag_cmd, rm_cmd, fsck_cmd)


def add_commands(cli: click.Group) -> None:
    """Add the store commands to the ``adapterhub`` group."""
    for command in COMMANDS:
        cli.add_command(command)
