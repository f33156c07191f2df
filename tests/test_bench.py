"""The benchmark suite: quick runs print RESULT lines and a markdown summary; the FLOP model is exact."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULT = re.compile(r"^RESULT bench=(\w+) metric=(\S+) ratio=(\S+)$")


def counted_flops(model, embeds, ids) -> int:
    """Matmul FLOPs torch's FlopCounterMode sees in one forward + backward to ``embeds``."""
    from torch.utils.flop_counter import FlopCounterMode

    x = embeds.detach().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        model(inputs_embeds=x, labels=ids).loss.backward()
    return counter.get_total_flops()


def test_step_flops_match_torch_flop_counter():
    """bench.overhead's analytic count (non-causal, as eager attention computes it) against torch's own."""
    import copy

    import torch

    import adapterhub
    from bench.common import llama
    from bench.overhead import step_flops
    from bench.train_step import QUICK, TARGETS

    cfg, batch, seq, r = QUICK["config"], QUICK["batch"], QUICK["seq"], QUICK["r"]
    base = llama(cfg)
    base.config._attn_implementation = "eager"
    base.requires_grad_(False)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        embeds = base.model.embed_tokens(ids)
    adapted = adapterhub.apply(copy.deepcopy(base), f"attn.{{{','.join(TARGETS)}}} -> lora(r={r}, alpha=16)\n")
    base_count = counted_flops(base, embeds, ids)
    adapted_count = counted_flops(adapted, embeds, ids)
    expected = step_flops(cfg, batch, seq, r, TARGETS, causal=False)
    assert base_count == expected["base"]
    assert adapted_count - base_count == expected["adapter"]
    causal = step_flops(cfg, batch, seq, r, TARGETS)
    assert causal["adapter"] == expected["adapter"] and causal["base"] < expected["base"]


def test_quick_suite_prints_results_and_writes_the_table(tmp_path):
    out = tmp_path / "results.md"
    proc = subprocess.run([sys.executable, "-m", "bench", "train_step", "overhead", "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ratios = {}
    for line in proc.stdout.splitlines():
        m = RESULT.match(line)
        if m:
            ratios[m.group(1)] = (m.group(2), float(m.group(3)))
    assert set(ratios) == {"train_step", "overhead"}
    assert ratios["train_step"][0] == "step_time" and ratios["train_step"][1] > 0
    assert ratios["overhead"][1] > 0
    text = out.read_text()
    assert "| benchmark | metric | ratio | details |" in text
    for name, (metric, ratio) in ratios.items():
        assert re.search(rf"^\| {name} \| {metric} \| {ratio:.3f} \| \S", text, re.M), text
    assert "## train_step" in text and "peak memory above model" in text
    assert "cores, torch" in text


def test_suite_reports_a_missing_benchmark_without_crashing(tmp_path):
    from bench.__main__ import parse_args, run_suite

    out = tmp_path / "r.md"
    assert run_suite(["no_such_benchmark"], parse_args(["--out", str(out)])) == 0
    assert re.search(r"^\| no_such_benchmark \| - \| missing \| bench/no_such_benchmark.py is not there \|$",
                     out.read_text(), re.M)


@pytest.mark.parametrize("argv", [["nope"], ["plan", "--quick"], ["plan", "--threads", "2"]])
def test_bad_requests_exit_2(argv, capsys):
    from bench.__main__ import main

    assert main(argv) == 2
    assert capsys.readouterr().err.strip()


def test_kernels_is_skipped_on_cpu_and_its_quick_run_uses_the_interpreter(tmp_path):
    """The GPU-kernel benchmark: a skipped row on the CPU; ``--quick`` runs the whole harness on the
    interpreter and the three sides (fused, torch path, PEFT) compute the same layer."""
    from bench.__main__ import parse_args, run_suite

    out = tmp_path / "r.md"
    assert run_suite(["kernels"], parse_args(["--device", "cpu", "--out", str(out)])) == 0
    assert re.search(r"^\| kernels \| - \| skipped \| needs CUDA", out.read_text(), re.M)
    assert run_suite(["kernels"], parse_args(["--quick", "--device", "cpu", "--out", str(out)])) == 0
    text = out.read_text()
    assert re.search(r"^\| kernels \| layer_step_time \| \d+\.\d{3} \| shapes=2, device=cpu \|$", text, re.M), text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| tiny")]
    assert len(rows) == 2
    for row in rows:
        to_torch, to_peft = (float(v) for v in row[7].split(" / "))
        assert to_torch < 2e-2 and to_peft < 2e-2  # bf16: one rounding of the largest entries
