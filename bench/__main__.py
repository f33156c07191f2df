"""Run benchmarks: ``python -m bench [NAME ...]``; with no name, all, then bench/results.md."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

from .common import ROOT

# names from DESIGN.md "Measuring" as they are implemented
BENCHMARKS = ["plan", "lora_fa_memory", "qlora", "merge", "longlora"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s): {', '.join(unknown)}; available: {', '.join(BENCHMARKS)}", file=sys.stderr)
        return 2
    if len(names) == 1:
        importlib.import_module(f"bench.{names[0]}").main()
        return 0
    rows = []
    for name in names:
        proc = subprocess.run([sys.executable, "-m", "bench", name], cwd=ROOT, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        rows.append((name, result[-1] if result else f"failed: {proc.stderr.strip()[-200:]}"))
    lines = [f"# adapterhub benchmarks ({time.strftime('%Y-%m-%d')}, CPU)", "",
             "| benchmark | metric | ratio (adapterhub / peer) |", "|---|---|---|"]
    for name, res in rows:
        fields = dict(kv.split("=", 1) for kv in res.split()[1:] if "=" in kv)
        lines.append(f"| {name} | {fields.get('metric', '-')} | {fields.get('ratio', res)} |")
    (ROOT / "bench" / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
