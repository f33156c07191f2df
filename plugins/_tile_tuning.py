"""Tile sizes of the fused LoRA / QLoRA GEMMs: measured once per GPU and shape class, then remembered.

On CUDA the first call of a GEMM kernel for a key ``(kernel, GPU, triton version, dtype, M bucket, N, K,
r bucket)`` times every candidate tile configuration (:func:`candidates`: ``BLOCK_M x BLOCK_N x BLOCK_K``,
warps, pipeline stages) on that call's own operands with ``triton.testing.do_bench``, keeps the fastest and
records it in ``<ADAPTERHUB_HOME>/kernel_tiles.json``. Later calls -- and later processes on the same GPU --
take the recorded one without timing, so a key always runs with the same tiles and the same rounding:
runs stay reproducible. A candidate that does not compile for the GPU (too much shared memory) is skipped.
The ``M`` bucket is ``M`` rounded up to a power of two (16 ... 8192), so a new batch or sequence length
does not re-tune.

``ADAPTERHUB_TILE_TUNING=off`` never times and uses :func:`default_blocks` (also the fallback when every
candidate failed to time). Under the CPU interpreter (``TRITON_INTERPRET=1``) the tiles are the smallest
legal ones (``INTERPRET_TILE``), so small test shapes span several tiles; the tests run every candidate
there too, for correctness.
"""

from __future__ import annotations

import json
import math
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adapterhub.registry import AdapterhubError

from ._triton import block, interpreting

#: largest M/N/K tile under the CPU interpreter (16: small test shapes span several tiles; the
#: interpreter's cost is per program, so larger tiles run faster there)
INTERPRET_TILE = 16
#: ``ADAPTERHUB_TILE_TUNING`` values
TUNING_MODES = ("auto", "off")
CACHE_FILE = "kernel_tiles.json"
CACHE_VERSION = 1

#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried for 16-bit operands; the first is the default
WIDE_CANDIDATES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 4, 4),
                   (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (16, 128, 128, 4, 4),
                   (32, 64, 128, 4, 4), (64, 256, 32, 8, 4))
#: the same for fp32 operands (twice the bytes per element: smaller tiles)
FP32_CANDIDATES = ((64, 64, 32, 4, 3), (128, 64, 32, 4, 3), (64, 128, 32, 4, 3), (128, 128, 32, 8, 3),
                   (32, 64, 64, 4, 3), (16, 64, 64, 4, 4), (64, 64, 64, 4, 2))

Blocks = dict[str, int]
Timer = Callable[[Callable[[], None]], float]

_LOCK = threading.Lock()
_MEMORY: dict[str, Blocks] = {}  # tuning key -> tiles (this process's and the cache file's)
_LOADED: set[Path] = set()
_SEEN: dict[tuple[Any, ...], Blocks] = {}  # (kernel, device, dtype, buckets...) -> tiles, for repeat calls


def tuning_mode() -> str:
    """``ADAPTERHUB_TILE_TUNING``: ``auto`` (default: time the candidates once per key) or ``off``."""
    mode = os.environ.get("ADAPTERHUB_TILE_TUNING", "").strip().lower() or "auto"
    if mode not in TUNING_MODES:
        raise AdapterhubError(f"ADAPTERHUB_TILE_TUNING={mode!r} is not one of: {', '.join(TUNING_MODES)}")
    return mode


def interpret_blocks(m: int, n: int, k: int) -> Blocks:
    """The interpreter's tiles: the smallest legal ones, so tests cover several tiles, K steps, r chunks."""
    t = INTERPRET_TILE
    return {"BLOCK_M": block(m, 16, t), "BLOCK_N": block(n, 16, t), "BLOCK_K": block(k, 16, t), "BLOCK_R": 16}


def fit(config: tuple[int, int, int, int, int], m: int, n: int, k: int, r: int) -> Blocks:
    """A candidate ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)`` shrunk to the problem (no tile larger
    than the next power of two of its dimension) plus ``BLOCK_R`` (``r`` in chunks of <= 32)."""
    bm, bn, bk, warps, stages = config
    return {"BLOCK_M": block(m, 16, bm), "BLOCK_N": block(n, 16, bn), "BLOCK_K": block(k, 16, bk),
            "BLOCK_R": block(r, 16, 32), "num_warps": warps, "num_stages": stages}


def candidates(m: int, n: int, k: int, r: int, dtype: torch.dtype) -> list[Blocks]:
    """The distinct fitted candidates for this problem, the default first."""
    out: list[Blocks] = []
    for config in WIDE_CANDIDATES if dtype != torch.float32 else FP32_CANDIDATES:
        blocks = fit(config, m, n, k, r)
        if blocks not in out:
            out.append(blocks)
    return out


def default_blocks(m: int, n: int, k: int, r: int, dtype: torch.dtype) -> Blocks:
    """Untimed GPU tiles: 128 x 128 x 64 (8 warps, 3 stages) for 16-bit operands, 64 x 64 x 32 for fp32."""
    return candidates(m, n, k, r, dtype)[0]


def cache_path() -> Path:
    from adapterhub.store_refs import default_home

    return default_home() / CACHE_FILE


def tuning_key(kernel: str, device: torch.device, dtype: torch.dtype, m: int, n: int, k: int, r: int) -> str:
    import triton

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return "|".join((kernel, gpu, f"triton-{triton.__version__}", str(dtype).removeprefix("torch."),
                     f"m{block(m, 16, 8192)}", f"n{n}", f"k{k}", f"r{block(r, 16, 32)}"))


def _read(path: Path) -> dict[str, Blocks]:
    """The valid records of the cache file (none if it is missing); ValueError etc. if it is unreadable."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if data.get("version") != CACHE_VERSION:
        raise ValueError(f"version {data.get('version')!r}, expected {CACHE_VERSION}")
    return {key: dict(b) for key, b in data["tiles"].items() if isinstance(key, str) and _valid(b)}


_UNREADABLE = (OSError, ValueError, KeyError, TypeError, AttributeError)


def _load(path: Path) -> None:
    """Merge the tile records on disk into memory once per path; an unreadable file is ignored (warned)."""
    if path in _LOADED:
        return
    _LOADED.add(path)
    try:
        for key, blocks in _read(path).items():
            _MEMORY.setdefault(key, blocks)
    except _UNREADABLE as exc:
        warnings.warn(f"ignoring the kernel tile cache {path}: {exc}; it is rewritten after the next tuning",
                      stacklevel=3)


def _valid(blocks: Any) -> bool:
    names = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_R", "num_warps", "num_stages")
    if not isinstance(blocks, dict) or set(blocks) != set(names):
        return False
    values = [blocks[n] for n in names]
    return all(isinstance(v, int) and v > 0 for v in values) and all(
        v >= 16 and v & (v - 1) == 0 for v in values[:4])


def _save(path: Path) -> None:
    """Rewrite the cache file atomically with every record known to this process (and on disk)."""
    from adapterhub.atomic import write_bytes

    try:
        tiles = _read(path)  # records another process wrote since this one loaded
    except _UNREADABLE:
        tiles = {}
    tiles.update(_MEMORY)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, json.dumps({"version": CACHE_VERSION, "tiles": tiles}, indent=1, sort_keys=True).encode())
    except OSError as exc:  # a read-only home still runs, it just re-tunes in the next process
        warnings.warn(f"could not record kernel tiles in {path}: {exc}", stacklevel=3)


def time_candidates(configs: list[Blocks], launch: Callable[[Blocks], None], timer: Timer) -> Blocks | None:
    """The fastest of ``configs`` by ``timer(lambda: launch(c))``; candidates that fail are skipped."""
    best, best_ms = None, math.inf
    for blocks in configs:
        try:
            ms = float(timer(lambda b=blocks: launch(b)))
        except Exception:  # noqa: BLE001 - out of shared memory / registers for this GPU: not a candidate
            continue
        if ms < best_ms:
            best, best_ms = blocks, ms
    return best


def _do_bench(fn: Callable[[], None]) -> float:
    import triton

    return float(triton.testing.do_bench(fn, warmup=5, rep=20))


def choose_blocks(kernel: str, x: torch.Tensor, m: int, n: int, k: int, r: int, dtype: torch.dtype,
                  launch: Callable[[Blocks], None], timer: Timer | None = None, *, gpu: bool | None = None) -> Blocks:
    """The tiles to launch ``kernel`` with (see the module docstring). ``launch(blocks)`` runs the kernel
    on the call's operands; it must be safe to repeat (the GEMMs write their output, never accumulate).
    ``gpu`` overrides whether ``x`` counts as on a GPU (tests); ``timer`` replaces ``do_bench`` (tests)."""
    if gpu is None:
        gpu = x.is_cuda and not interpreting()
    if not gpu:
        return interpret_blocks(m, n, k)
    if tuning_mode() == "off":
        return default_blocks(m, n, k, r, dtype)
    seen = (kernel, x.device, dtype, block(m, 16, 8192), n, k, block(r, 16, 32))
    hit = _SEEN.get(seen)  # the per-call path: one dict lookup
    if hit is not None:
        return hit
    key = tuning_key(kernel, x.device, dtype, m, n, k, r)
    path = cache_path()
    with _LOCK:
        _load(path)
        if key not in _MEMORY:
            best = time_candidates(candidates(m, n, k, r, dtype), launch, timer or _do_bench)
            if best is None:
                warnings.warn(f"no tile configuration of {kernel} could be timed for {key}; using the default",
                              stacklevel=2)
                return default_blocks(m, n, k, r, dtype)
            _MEMORY[key] = best
            _save(path)
        _SEEN[seen] = _MEMORY[key]
        return _MEMORY[key]


def forget() -> None:
    """Drop the in-memory records (tests; the next call re-reads the cache file)."""
    with _LOCK:
        _MEMORY.clear()
        _LOADED.clear()
        _SEEN.clear()
