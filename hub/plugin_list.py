"""``adapterhub plugins``: what is installed, who registered it, and its parameters."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from adapterhub.registry import describe, get_registry


def _params(obj: Any) -> list[dict[str, Any]]:
    params_cls = getattr(obj, "Params", None)
    if params_cls is None:
        return []
    return [{"name": p.name, "type": p.type, "default": p.default, "help": p.help} for p in describe(params_cls)]


def plugin_listing() -> dict[str, Any]:
    reg = get_registry()

    def entry(kind: str, name: str, obj: Any, **extra: Any) -> dict[str, Any]:
        return {"name": name, "plugin": reg.owner(kind, name), "summary": getattr(obj, "summary", ""),
                "paper": getattr(obj, "paper", ""), "params": _params(obj), **extra}

    return {
        "plugins": reg.plugin_names(),
        "variants": [entry("variant", n, v, wraps=sorted(v.kinds), mergeable=v.mergeable)
                     for n, v in sorted(reg.variants.items())],
        "quantizers": [entry("quantizer", n, q, quantizes=sorted(q.kinds)) for n, q in sorted(reg.quantizers.items())],
        "merge_methods": [entry("merge method", n, m) for n, m in sorted(reg.merge_methods.items())],
        "aliases": {role: list(names) for role, names in sorted(reg.alias_table().items())},
    }


def _param_text(params: list[dict[str, Any]]) -> str:
    return "\n".join(f"{p['name']}={p['default']!r}  ({p['type']}) {p['help']}" for p in params)


def print_plugins(listing: dict[str, Any], console: Console) -> None:
    for section, title in (("variants", "Variants"), ("quantizers", "Quantizers (on ...)"),
                           ("merge_methods", "Merge methods")):
        table = Table(title=title, title_justify="left", show_lines=True)
        for col in ("name", "what it does", "parameters (default)", "plugin"):
            table.add_column(col)
        for e in listing[section]:
            what = e["summary"] + (f"\n[dim]{e['paper']}[/dim]" if e["paper"] else "")
            if "wraps" in e:
                what += f"\n[dim]wraps: {', '.join(e['wraps'])}{'' if e['mergeable'] else '; not mergeable'}[/dim]"
            table.add_row(e["name"], what, _param_text(e["params"]), e["plugin"])
        console.print(table)
    table = Table(title="Role aliases", title_justify="left")
    table.add_column("role")
    table.add_column("also matches")
    for role, names in listing["aliases"].items():
        table.add_row(role, ", ".join(names[1:]))
    console.print(table)
