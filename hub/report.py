"""Rendering plans for people: a rich table (per-layer rows collapsed into index ranges) + totals."""

from __future__ import annotations

import re
from collections.abc import Iterable

from rich.console import Console
from rich.table import Table

from .planning import Plan, PlanEntry

_INDEX = re.compile(r"(?<=\.)(\d+)(?=\.|$)")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def index_ranges(indices: Iterable[int]) -> str:
    """``[0..3,7]``: the DSL's layer-range syntax for ``indices``."""
    xs = sorted(set(indices))
    parts, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            parts.append(str(start) if start == a else f"{start}..{a}")
            start = b
    return "[" + ",".join(parts) + "]"


def _call(name: str, params: dict, table: dict) -> str:
    """``name(k=v, ...)`` with only the arguments that differ from the plugin's defaults."""
    from adapterhub.registry import to_dict

    plugin = table.get(name)
    defaults = to_dict(plugin.Params()) if plugin is not None else {}
    args = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items() if defaults.get(k, object()) != v)
    return f"{name}({args})" if args else name


def _describe(e: PlanEntry) -> str:
    if e.action != "variant":
        return e.action
    from adapterhub.registry import get_registry

    return _call(e.variant, e.params, get_registry().variants)


def _quant(e: PlanEntry) -> str:
    if not e.quant:
        return ""
    from adapterhub.registry import get_registry

    return _call(e.quant, e.quant_params, get_registry().quantizers)


def grouped_rows(plan: Plan) -> list[tuple[str, str, str, int, str, int]]:
    """Rows ``(module, action, quant, trainable, rule_line, count)``; modules that differ only in
    one layer index and share everything else become one row ``model.layers.[0..31].self_attn.q_proj``."""
    groups: dict[tuple, list[tuple[int | None, PlanEntry]]] = {}
    for e in plan.entries:
        m = _INDEX.search(e.module)
        key_name = _INDEX.sub("#", e.module, count=1) if m else e.module
        key = (key_name, _describe(e), _quant(e), e.trainable, e.rule_line)
        groups.setdefault(key, []).append((int(m.group(1)) if m else None, e))
    rows = []
    for (key_name, action, quant, trainable, line), members in groups.items():
        idx = [i for i, _ in members if i is not None]
        name = key_name.replace("#", index_ranges(idx), 1) if idx and len(members) > 1 else members[0][1].module
        rows.append((name, action, quant, trainable * len(members), str(line), len(members)))
    return rows


def plan_table(plan: Plan, full: bool = False) -> Table:
    table = Table(title=f"plan: {plan.spec.filename} on {plan.model}", title_justify="left")
    table.add_column("module")
    table.add_column("action")
    table.add_column("quant")
    table.add_column("trainable", justify="right")
    table.add_column("rule", justify="right")
    if full:
        rows = [(e.module, _describe(e), _quant(e), e.trainable, str(e.rule_line), 1) for e in plan.entries]
    else:
        rows = grouped_rows(plan)
    for name, action, quant, trainable, line, count in rows:
        label = f"{name}  (x{count})" if count > 1 else name
        table.add_row(label, action, quant, f"{trainable:,}", line)
    return table


def totals_text(plan: Plan) -> str:
    s = plan.summary()
    return (f"trainable params: {s['trainable_params']:,} of {s['total_params']:,} "
            f"({s['trainable_percent']:.4f}%)   weights: {human_bytes(s['weight_bytes_before'])} -> "
            f"{human_bytes(s['weight_bytes_after'])}")


def make_console(**kwargs) -> Console:
    """A console for tables: the terminal's width, or 160 columns when output is piped."""
    import sys

    return Console(width=None if sys.stdout.isatty() else 160, **kwargs)


def print_plan(plan: Plan, console: Console | None = None, full: bool = False) -> None:
    console = console or make_console()
    console.print(plan_table(plan, full=full))
    console.print(totals_text(plan))
    for w in plan.warnings:
        console.print(f"[yellow]warning:[/yellow] {w}", highlight=False)
