"""Run benchmarks: ``python -m bench [NAME ...] [--quick] [--device cpu|cuda] [--out FILE]``.

One name runs that benchmark in this process. Several names (or none: every benchmark) run each in a
fresh process and summarise their RESULT lines in a markdown table -- benchmark | metric | ratio |
details, the machine above it and every benchmark's own tables below it -- written to
bench/results.md when the whole suite ran (not ``--quick``), or to ``--out``. A benchmark whose
module is not there is reported as "missing"; one that fails as "failed" (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .common import ROOT, machine

# every name in DESIGN.md "Measuring", in the order the suite runs them
BENCHMARKS = ["train_step", "overhead", "qlora", "lora_fa_memory", "merge", "serving", "plan", "longlora", "kernels"]
#: benchmarks that time GPU kernels: the suite skips them on the CPU, except their --quick smoke runs (which
#: run on the Triton CPU interpreter)
CUDA_ONLY = {"kernels"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    about = ("Run adapterhub's benchmarks against PEFT: each prints its tables and, last, RESULT bench=NAME "
             "metric=... ratio=<adapterhub / PEFT>; several (default: all) are summarised in a markdown table.")
    ap = argparse.ArgumentParser(prog="python -m bench", description=about,
                                 epilog=f"benchmarks: {', '.join(BENCHMARKS)}")
    ap.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run on tiny shapes (only benchmarks with a quick mode; the others are skipped)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="where benchmarks that take a device run (auto: cuda when available)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                    help="model dtype for benchmarks that take one (default: float32 on CPU, bfloat16 on CUDA)")
    ap.add_argument("--threads", type=int, help="torch CPU threads for benchmarks that take it (default: 1)")
    ap.add_argument("--out", type=Path, help="write the markdown summary here (default: bench/results.md "
                                             "after a full, non-quick run of every benchmark)")
    return ap.parse_args(argv)


OPTIONS = ("quick", "device", "dtype", "threads")


def options(name: str) -> set[str]:
    """The keyword options (of :data:`OPTIONS`) that benchmark ``name``'s ``main`` takes."""
    params = inspect.signature(importlib.import_module(f"bench.{name}").main).parameters
    return {p for p in OPTIONS if p in params}


def flags(args: argparse.Namespace, takes: set[str], device: str) -> list[str]:
    """The command-line flags passed on to a benchmark that takes ``takes``."""
    out = ["--quick"] if args.quick and "quick" in takes else []
    out += ["--device", device] if "device" in takes else []
    for name in ("dtype", "threads"):
        if getattr(args, name) is not None and name in takes:
            out += [f"--{name}", str(getattr(args, name))]
    return out


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_one(name: str, args: argparse.Namespace) -> int:
    takes = options(name)
    kwargs: dict[str, Any] = {}
    if args.quick:
        if "quick" not in takes:
            print(f"{name} has no --quick mode", file=sys.stderr)
            return 2
        kwargs["quick"] = True
    if "device" in takes:
        kwargs["device"] = resolve_device(args.device)
    elif args.device == "cuda":
        print(f"{name} runs on the CPU only", file=sys.stderr)
        return 2
    for opt in ("dtype", "threads"):
        if getattr(args, opt) is not None:
            if opt not in takes:
                print(f"{name} does not take --{opt}", file=sys.stderr)
                return 2
            kwargs[opt] = getattr(args, opt)
    importlib.import_module(f"bench.{name}").main(**kwargs)
    return 0


def parse_output(stdout: str) -> dict[str, Any]:
    """RESULT fields, DETAIL fields and TABLE objects from a benchmark's output."""
    def fields(line: str) -> dict[str, str]:
        return dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)

    lines = stdout.splitlines()
    results = [fields(line) for line in lines if line.startswith("RESULT ")]
    details: dict[str, str] = {}
    for line in lines:
        if line.startswith("DETAIL "):
            details.update({k: v for k, v in fields(line).items() if k != "bench"})
    tables = [json.loads(line[6:]) for line in lines if line.startswith("TABLE ")]
    return {"result": results[-1] if results else None, "details": details, "tables": tables}


def cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], device: str, quick: bool) -> str:
    """The summary table (one row per benchmark), the machine, then each benchmark's own tables."""
    where = (f"GPU {info['gpu']} where a benchmark takes --device, CPU otherwise" if device == "cuda" and "gpu" in info
             else "CPU")
    lines = [f"# adapterhub benchmarks ({time.strftime('%Y-%m-%d')}, {where}{', quick' if quick else ''})", "",
             f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}"
             + (f", GPU {info['gpu']}" if "gpu" in info else "") + ". "
             "Each ratio is adapterhub / PEFT (the peer), measured in one run on the same model and inputs; "
             "below 1 is better for adapterhub (for `overhead`: 1.0 = at the FLOP limit).", "",
             "| benchmark | metric | ratio | details |", "|---|---|---|---|"]
    for row in rows:
        res = row["result"] or {}
        details = (", ".join(f"{k}={v}" for k, v in row["details"].items()) or row.get("note")
                   or ("tables below" if row["tables"] else ""))
        lines.append(f"| {row['name']} | {cell(res.get('metric', '-'))} | {cell(res.get('ratio', row['status']))} "
                     f"| {cell(details)} |")
    for row in rows:
        if not row["tables"]:
            continue
        lines += ["", f"## {row['name']}"]
        for table in row["tables"]:
            lines += ["", cell(table["title"]), "", "| " + " | ".join(cell(c) or " " for c in table["columns"]) + " |",
                      "|" + "---|" * len(table["columns"])]
            lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in table["rows"]]
    return "\n".join(lines) + "\n"


def run_suite(names: list[str], args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    rows, failed = [], False
    for i, name in enumerate(names, 1):
        row: dict[str, Any] = {"name": name, "result": None, "details": {}, "tables": []}
        rows.append(row)
        if importlib.util.find_spec(f"bench.{name}") is None:
            row["status"], row["note"] = "missing", f"bench/{name}.py is not there"
            print(f"[{i}/{len(names)}] {name}: missing", flush=True)
            continue
        takes = options(name)
        if args.quick and "quick" not in takes:
            row["status"], row["note"] = "skipped", "no quick mode"
            print(f"[{i}/{len(names)}] {name}: skipped (no quick mode)", flush=True)
            continue
        env = dict(os.environ)
        if name in CUDA_ONLY and device != "cuda":
            if not args.quick:
                row["status"], row["note"] = "skipped", "needs CUDA (times the Triton kernels on a GPU)"
                print(f"[{i}/{len(names)}] {name}: skipped (needs CUDA)", flush=True)
                continue
            env["TRITON_INTERPRET"] = "1"
        cmd = [sys.executable, "-m", "bench", name, *flags(args, takes, device)]
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        sys.stdout.write(proc.stdout)
        row.update(parse_output(proc.stdout))
        if proc.returncode != 0 or row["result"] is None:
            failed = True
            row["status"], row["note"] = "failed", (proc.stderr.strip() or proc.stdout.strip())[-300:]
            print(f"[{i}/{len(names)}] {name} failed:\n{proc.stderr[-2000:]}", flush=True)
        else:
            row["status"] = "ok"
            print(f"[{i}/{len(names)}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)
    text = markdown(rows, machine(), device, args.quick)
    out = args.out or (ROOT / "bench" / "results.md" if names == BENCHMARKS and not args.quick else None)
    if out is not None:
        from adapterhub.atomic import write_bytes

        write_bytes(Path(out), text.encode())
        print(f"wrote {out}")
    print(text)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    names = args.names or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    if len(names) == 1 and args.out is None:
        if importlib.util.find_spec(f"bench.{names[0]}") is None:
            print(f"benchmark {names[0]} is missing (bench/{names[0]}.py is not there)", file=sys.stderr)
            return 2
        return run_one(names[0], args)
    return run_suite(names, args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
