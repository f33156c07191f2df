"""Tile tuning of the fused GEMMs (``plugins/_tile_tuning.py``).

Every candidate tile configuration the GPU tuner may pick is run here under the interpreter (the GPU's
own tiles, not the interpreter's 16-wide ones) and checked against float64 formulas, for the dense LoRA
GEMM (forward and the transposed dx form) and the 4-bit one; under ``ADAPTERHUB_TEST_TRITON_GPU=1``
compiled on CUDA (``kernel_device``; a candidate too large for that GPU's shared memory is skipped, as
the tuner skips it, but the default must run). The choice itself -- timing, the on-disk record, reuse
across processes, the off switch, failing candidates, a damaged record -- is tested with a stand-in
timer (``gpu=True`` takes the GPU branch on CPU tensors).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("triton")

from adapterhub.plugins import _lora_kernel as lk  # noqa: E402
from adapterhub.plugins import _nf4_kernel as nk  # noqa: E402
from adapterhub.plugins import _tile_tuning as tiles  # noqa: E402
from adapterhub.registry import AdapterhubError  # noqa: E402

from .test_lora_kernel import rel  # noqa: E402
from .test_nf4_kernel import decode, nf4  # noqa: E402

# M, K, N, r: M over 256 and N over 128 so that the largest candidate tiles are used whole, with edges
SHAPE = (300, 136, 264, 12)


def all_candidates(dtype: torch.dtype) -> list[dict[str, int]]:
    m, k, n, r = SHAPE
    return tiles.candidates(m, n, k, r, dtype)


def run_or_skip(fn, blocks, default):
    """``fn(blocks)``, or None where a non-default candidate needs more shared memory than this GPU has."""
    from triton.runtime.errors import OutOfResources

    try:
        return fn(blocks)
    except OutOfResources:
        if blocks == default:
            raise
        return None


@pytest.fixture(autouse=True)
def fresh_records(tmp_path, monkeypatch):
    """Every test starts with no tile records, in memory or on disk (``ADAPTERHUB_HOME`` = tmp)."""
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ADAPTERHUB_TILE_TUNING", raising=False)
    tiles.forget()
    yield
    tiles.forget()


def test_candidates_are_legal_distinct_and_fitted():
    for dtype in (torch.float32, torch.bfloat16):
        got = all_candidates(dtype)
        assert got[0] == tiles.default_blocks(300, 264, 136, 12, dtype)
        assert len({json.dumps(c, sort_keys=True) for c in got}) == len(got) > 4
        for c in got:
            assert all(c[b] >= 16 and c[b] & (c[b] - 1) == 0 for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R"))
    assert tiles.default_blocks(300, 264, 136, 12, torch.bfloat16)["BLOCK_M"] == 128
    assert tiles.default_blocks(300, 264, 136, 12, torch.float32)["BLOCK_M"] == 64
    # a decode-sized problem: no tile wider than the next power of two of its dimension
    small = tiles.candidates(3, 40, 24, 4, torch.float16)
    assert all(c["BLOCK_M"] == 16 and c["BLOCK_N"] <= 64 and c["BLOCK_K"] <= 32 for c in small)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_candidate_computes_the_lora_gemm(dtype, kernel_device):
    m, k, n, r = SHAPE
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    low, up = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    gr = torch.randn(m, n, generator=g).to(dtype)
    x, W, b, low, up, gr = (t.to(kernel_device) for t in (x, W, b, low, up, gr))
    want = x.double() @ W.double().t() + b.double() + 0.5 * low.double() @ up.double()
    want_dx = gr.double() @ W.double() + 0.5 * low.double() @ up[:, :k].double()
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    for blocks in all_candidates(dtype):
        got = run_or_skip(lambda c: lk.lora_gemm(x, W.t(), b, low, up, 0.5, dtype, blocks=c), blocks,
                          all_candidates(dtype)[0])
        if got is None:
            continue
        assert rel(got, want) < tol, blocks
        dx = lk.lora_gemm(gr, W, None, low, up[:, :k], 0.5, dtype, blocks=blocks)  # the backward's transposed form
        assert rel(dx, want_dx) < tol, blocks


@pytest.mark.parametrize("transpose", [False, True])
def test_every_candidate_computes_the_4bit_gemm(transpose, kernel_device):
    m, k, n, r = SHAPE
    q = nf4(n, k, blocksize=64, double_quant=True, device=kernel_device)
    w = decode(q).double()  # n x k
    g = torch.Generator().manual_seed(1)
    x = torch.randn(m, n if transpose else k, generator=g)
    width = k if transpose else n
    low, up = torch.randn(m, r, generator=g), torch.randn(r, width, generator=g)
    x, low, up = (t.to(kernel_device) for t in (x, low, up))
    want = x.double() @ (w if transpose else w.t()) + 0.25 * low.double() @ up.double()
    bias = None
    if not transpose:
        bias = q.bias
        want = want + q.bias.double()
    for blocks in all_candidates(torch.float32):
        got = run_or_skip(lambda c: nk.nf4_lora_gemm(x, q, transpose=transpose, bias=bias, low=low, up=up, s=0.25,
                                                     blocks=c), blocks, all_candidates(torch.float32)[0])
        assert got is None or rel(got, want) < 2e-6, blocks


class FakeTimer:
    """Milliseconds by tile shape: the config with ``BLOCK_N == fast_n`` is fastest; ``broken`` ones raise."""

    def __init__(self, fast_n: int = 128, broken: tuple[int, ...] = ()):
        self.fast_n, self.broken, self.timed = fast_n, broken, []

    def __call__(self, fn) -> float:
        fn()
        blocks = self.last
        self.timed.append(blocks)
        if blocks["BLOCK_M"] in self.broken:
            raise RuntimeError("out of shared memory")
        return 1.0 if blocks["BLOCK_N"] == self.fast_n and blocks["BLOCK_M"] == 64 else 2.0 + blocks["BLOCK_M"] / 1000


def choose(timer: FakeTimer, m: int = 300, n: int = 264, k: int = 136, r: int = 12, dtype=torch.bfloat16):
    x = torch.zeros(1, 1)

    def launch(blocks):
        timer.last = blocks

    return tiles.choose_blocks("lora_gemm", x, m, n, k, r, dtype, launch, timer, gpu=True)


def test_tuning_picks_the_fastest_and_records_it_for_later_processes():
    timer = FakeTimer()
    best = choose(timer)
    assert best["BLOCK_M"] == 64 and best["BLOCK_N"] == 128
    assert timer.timed == all_candidates(torch.bfloat16)  # each candidate timed once
    record = json.loads(tiles.cache_path().read_text())
    assert record["version"] == tiles.CACHE_VERSION and list(record["tiles"].values()) == [best]
    again = FakeTimer(fast_n=256)
    assert choose(again, m=500) == best and again.timed == []  # same M bucket (512): no timing
    tiles.forget()  # a new process: the record on disk is used
    assert choose(again, m=257) == best and again.timed == []
    assert choose(again, m=600) != best and again.timed  # another M bucket is tuned on its own
    assert len(json.loads(tiles.cache_path().read_text())["tiles"]) == 2


def test_failing_candidates_are_skipped_and_all_failing_falls_back():
    timer = FakeTimer(broken=(64,))
    best = choose(timer)
    assert best["BLOCK_M"] != 64
    timer = FakeTimer(broken=(16, 32, 64, 128, 256))
    with pytest.warns(UserWarning, match="no tile configuration of lora_gemm could be timed"):
        got = choose(timer, n=512)
    assert got == tiles.default_blocks(300, 512, 136, 12, torch.bfloat16)


def test_off_switch_damaged_record_and_bad_value(monkeypatch):
    monkeypatch.setenv("ADAPTERHUB_TILE_TUNING", "off")
    timer = FakeTimer()
    assert choose(timer) == tiles.default_blocks(300, 264, 136, 12, torch.bfloat16)
    assert timer.timed == [] and not tiles.cache_path().exists()
    monkeypatch.setenv("ADAPTERHUB_TILE_TUNING", "fast")
    with pytest.raises(AdapterhubError, match="ADAPTERHUB_TILE_TUNING='fast' is not one of: auto, off"):
        choose(timer)
    monkeypatch.delenv("ADAPTERHUB_TILE_TUNING")
    tiles.cache_path().parent.mkdir(parents=True)
    tiles.cache_path().write_text('{"version": 1, "tiles": {"x": {"BLOCK_M": 3}')  # truncated JSON
    with pytest.warns(UserWarning, match="ignoring the kernel tile cache"):
        best = choose(timer)
    assert timer.timed and json.loads(tiles.cache_path().read_text())["tiles"] == {
        tiles.tuning_key("lora_gemm", torch.device("cpu"), torch.bfloat16, 300, 264, 136, 12): best}


def test_invalid_records_are_not_used():
    key = tiles.tuning_key("lora_gemm", torch.device("cpu"), torch.bfloat16, 300, 264, 136, 12)
    tiles.cache_path().parent.mkdir(parents=True)
    bad = {"BLOCK_M": 48, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_R": 16, "num_warps": 4, "num_stages": 3}
    tiles.cache_path().write_text(json.dumps({"version": 1, "tiles": {key: bad}}))
    timer = FakeTimer()
    assert choose(timer)["BLOCK_M"] == 64 and timer.timed  # 48 is no power of two: re-tuned


def test_cpu_tensors_get_the_interpreter_tiles():
    x = torch.zeros(1, 1)
    got = tiles.choose_blocks("lora_gemm", x, 300, 264, 136, 12, torch.bfloat16, lambda b: None)
    assert got == {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "BLOCK_R": 16}
    assert not tiles.cache_path().exists()
