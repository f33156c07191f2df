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


def run_sides(module: str, sides: list[str], args: dict[str, Any], repeats: int = 3) -> dict[str, dict[str, Any]]:
    """Like :func:`run_side` for several sides, the processes taking turns (ABBA order: round ``k``
    runs the sides reversed when ``k`` is odd) so that a slow spell of the shared machine hits every
    side alike. Per side: the median seconds and peak bytes, ``extra`` of its first run, ``runs``."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for k in range(repeats):
        for side in (sides if k % 2 == 0 else sides[::-1]):
            runs[side].append(run_side(module, side, args, repeats=1)["runs"][0])
    return {side: {"seconds": statistics.median(r["seconds"] for r in rs),
                   "peak_bytes": statistics.median(r["peak_bytes"] for r in rs),
                   "extra": rs[0].get("extra"), "runs": rs} for side, rs in runs.items()}


def synchronize(device: str) -> None:
    """Wait for queued GPU work (no-op on CPU): call before reading a clock."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def machine() -> dict[str, Any]:
    """CPU model, cores, torch version and, when CUDA is available, the GPU's name."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def llama(config: dict[str, Any], dtype: str = "float32", device: str = "cpu"):
    """A ``LlamaForCausalLM`` from ``config`` with N(0, 0.02) weights and unit norms from seed 0
    (transformers' slow init skipped), in ``dtype`` on ``device``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.utils import logging

    logging.set_verbosity_error()
    with no_init_weights():
        model = LlamaForCausalLM(LlamaConfig(**config)).float()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)
    return model.to(device=device, dtype=getattr(torch, dtype))


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


#: every table this process printed, emitted as ``TABLE {json}`` before the RESULT line (the suite
#: copies them into bench/results.md)
TABLES: list[dict[str, Any]] = []


def print_table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    TABLES.append({"title": title, "columns": list(columns), "rows": [[str(x) for x in r] for r in rows]})
    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*[str(x) for x in r])
    Console().print(table)


def result_line(bench: str, metric: str, ratio: float, **details: Any) -> str:
    """Print the tables as ``TABLE {json}`` lines, ``details`` as ``DETAIL bench=NAME key=value ...``
    (the numbers behind the ratio), then, last, ``RESULT bench=NAME metric=... ratio=...``."""
    for table in TABLES:
        print("TABLE " + json.dumps(table, ensure_ascii=False))
    if details:
        print(f"DETAIL bench={bench} " + " ".join(f"{k}={str(v).replace(' ', '_')}" for k, v in details.items()))
    line = f"RESULT bench={bench} metric={metric} ratio={ratio:.3f}"
    print(line, flush=True)
    return line
