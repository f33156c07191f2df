"""Helpers shared by benchmarks: measuring one side in a fresh process, tables, the RESULT line."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def measure(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` once: wall seconds and peak RSS above the RSS before it started."""
    import gc

    gc.collect()
    reset_peak()
    base = rss_bytes()
    t0 = time.perf_counter()
    extra = fn()
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_bytes": max(0, peak_rss_bytes() - base), "extra": extra}


def run_side(module: str, side: str, args: dict[str, Any], repeats: int = 3) -> dict[str, Any]:
    """Run ``python -m <module> --side <side>`` ``repeats`` times in fresh processes; median result."""
    runs = []
    for _ in range(repeats):
        proc = subprocess.run([sys.executable, "-m", module, "--side", side, "--args", json.dumps(args)],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            raise SystemExit(f"{module} --side {side} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
            "extra": runs[0].get("extra"), "runs": runs}


def side_main(sides: dict[str, Callable[[dict[str, Any]], Any]]) -> bool:
    """If invoked as ``--side NAME --args JSON``, run that side, print its JSON, return True."""
    if "--side" not in sys.argv:
        return False
    side = sys.argv[sys.argv.index("--side") + 1]
    args = json.loads(sys.argv[sys.argv.index("--args") + 1])
    setup = sides[side](args)  # returns the function to time (imports done before)
    print(json.dumps(measure(setup)))
    return True


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console().print(table)


def result_line(bench: str, metric: str, ratio: float) -> str:
    line = f"RESULT bench={bench} metric={metric} ratio={ratio:.3f}"
    print(line, flush=True)
    return line
