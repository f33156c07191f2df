"""``lq``: mixed-configuration NF-b quantization under a bits-per-parameter budget (LQ-LoRA).

Guo, Greengard, Xing, Kim, *LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient
Language Model Finetuning*, 2023 (ICLR'24), arXiv 2311.12023.

**Format** (``plugins/_nfk.py``): NF-b codes (b = ``bits``) with two-level scales -- an absmax per
block of ``B0`` weights, shifted by the matrix's smallest absmax and stored as unsigned ``b0``-bit
codes, scaled per ``B1`` blocks by a ``b1`` (bf16/fp16/fp32) second-level scale. Storage is
``b + b0/B0 + b1/(B0 B1)`` bits per weight (plus one fp32 offset per matrix); ``LqLinear`` keeps
the codes bit-packed, so ``weight_bytes()`` is the real size. With no ``budget`` one fixed config
is used (unset fields: ``bits=4, b0=8, B0=64, b1=fp32, B1=256``, 4.127 bits/param).

**Allocation** (``budget=...``): for every matrix ``m`` and every config ``c`` of the grid
(``b in {2,3,4,8}``, ``b0 in {2,3,4,8}``, ``B0 in {16,32,64}``, ``b1 in {bf16,fp16,fp32}``,
``B1 in {16,64,256}``: 432; a parameter given as a value or list restricts its axis) the error
``e[m,c] = ||W - Q - L1 L2||_F^2`` of the LQ decomposition at rank ``rank`` is computed; then the
integer linear program (a multiple-choice knapsack)::

    minimise  sum_{m,c} e[m,c] x[m,c]   s.t.  sum_c x[m,c] = 1,
              sum_{m,c} bits_c n_m x[m,c] <= budget * sum_m n_m,   x binary

``solver="milp"`` solves it with ``scipy.optimize.milp`` (HiGHS, 60 s limit; the paper used
Gurobi, 60 s). ``solver="auto"`` (default) first runs an exact dynamic program over the Pareto
front of (bits, error) pairs, matrix by matrix, and falls back to the MILP when the front exceeds
200k points (large models, where the LP bound is tight and HiGHS is quick): with few matrices
(the built-in models' 16) HiGHS can spend its whole time limit closing a 1-2% gap among nearly
symmetric choices, while the DP is exact in about a second. Both keep the average 1e-6 below budget.

By default (``alloc_iters=1``) ``e`` is the paper's first iteration -- ``L1 L2 = SVD_k(W)``, error
of quantizing ``W - L1 L2`` -- with the SVD shared by all configs; ``alloc_iters=T`` runs up to
``T`` full decomposition iterations per config (the paper's code runs the full decomposition:
exact but slow). Configs a cheaper, no-worse config dominates are dropped before solving (exact).

**Fisher weighting** (``fisher="file.safetensors"``, made by ``adapterhub lq-fisher``): ``F`` is
the summed squared per-sample gradient of the LM loss on calibration text; errors become
``||sqrt(F) * (W - Q - L1 L2)||_F^2`` and the SVD is row/column weighted (``_nfk.py``). The file
is needed because allocation sees weights, not the model.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from adapterhub.plugins._bnb import BnbQuantizedLinear, ComputeDtype, compute_dtype_of, linear_weight
from adapterhub.plugins._lq_fisher import FisherFile, lq_fisher_cmd
from adapterhub.plugins._nfk import (
    GRID,
    NfConfig,
    block_scales,
    config_errors,
    dequantize_flat,
    fake_quantize,
    fisher_weights,
    low_rank,
    lq_decompose,
    pack_bits,
    quantize_flat,
    unpack_bits,
)
from adapterhub.plugins._saved_base import saved_quant_params
from adapterhub.registry import AdapterhubError, ModuleInfo, ParamError, Quantizer, hookimpl, param

ScaleType = Literal["bf16", "fp16", "fp32"]
DEFAULT = NfConfig(bits=4, b0=8, B0=64, b1="fp32", B1=256)
CONFIG_FIELDS = ("bits", "b0", "B0", "b1", "B1")
BUDGET_TOLERANCE = 1e-6  # the ILP's bits row is kept this far inside the budget (solver tolerance)
ILP_SECONDS = 60  # HiGHS time limit (the paper gave Gurobi 60 s)
DP_MAX_POINTS = 200_000  # solver="auto": the exact DP while its Pareto front stays this small


@dataclass(frozen=True)
class LqParams:
    budget: float | None = param(None, "average bits per weight, scales included, over the rule's matrices "
                                       "(configs chosen per matrix by an ILP); unset: one fixed config",
                                 positive=True)
    bits: int | tuple[int, ...] | None = param(None, "NF bits per weight, 2..8, or the ILP's choices "
                                                     "(grid 2,3,4,8; default 4)")
    b0: int | tuple[int, ...] | None = param(None, "bits of the first-level block scales, 2..8 "
                                                   "(grid 2,3,4,8; default 8)")
    B0: int | tuple[int, ...] | None = param(None, "weights per first-level scale (grid 16,32,64; default 64)")
    b1: ScaleType | tuple[ScaleType, ...] | None = param(None, "dtype of the second-level scales "
                                                               "(grid bf16,fp16,fp32; default fp32)")
    B1: int | tuple[int, ...] | None = param(None, "first-level scales per second-level scale "
                                                   "(grid 16,64,256; default 256)")
    rank: int = param(64, "rank k of L1 L2 in the allocation's error (lqlora: must equal r; other "
                          "variants: 0, the plain quantization error)", min=0)
    alloc_iters: int = param(1, "LQ iterations per config when allocating (1: SVD_k(W) once, fast; "
                                "up to 100: the full decomposition)", min=1, max=100)
    fisher: str = param("", "Fisher-information safetensors from `adapterhub lq-fisher` weighting the "
                            "errors (empty: unweighted)")
    solver: Literal["auto", "milp"] = param("auto", "allocation ILP solver: auto (exact Pareto DP, MILP "
                                                    "for large models) or milp (scipy/HiGHS)")
    compute_dtype: ComputeDtype = param("auto", "dtype of the dequantized matmul (auto: the input's)")

    def __post_init__(self) -> None:
        limits = {"bits": (2, 8), "b0": (2, 8), "B0": (1, 1 << 16), "B1": (1, 1 << 16)}
        for name in CONFIG_FIELDS:
            value = getattr(self, name)
            values = value if isinstance(value, tuple) else () if value is None else (value,)
            if isinstance(value, tuple) and (not value or len(set(value)) != len(value)):
                raise ParamError(f"{name} must list distinct choices, got {list(value)}", param=name)
            if isinstance(value, tuple) and self.budget is None:
                raise ParamError(f"{name}={list(value)} lists choices for the allocation: give budget=... too",
                                 param=name)
            lo, hi = limits.get(name, (None, None))
            for v in values:
                if lo is not None and not lo <= v <= hi:
                    raise ParamError(f"{name} must be in {lo}..{hi}, got {v}", param=name)


def choices(params: LqParams) -> dict[str, tuple[Any, ...]]:
    """Each config axis: the given value(s), else the grid under a budget, else the default."""
    out = {}
    for name in CONFIG_FIELDS:
        value = getattr(params, name)
        if value is None:
            out[name] = GRID[name] if params.budget is not None else (getattr(DEFAULT, name),)
        else:
            out[name] = value if isinstance(value, tuple) else (value,)
    return out


def configs_of(params: LqParams) -> list[NfConfig]:
    axes = choices(params)
    return [NfConfig(*combo) for combo in itertools.product(*(axes[n] for n in CONFIG_FIELDS))]


def fixed_config(params: LqParams) -> NfConfig | None:
    """The one config ``params`` allows, or ``None`` when an allocation must choose."""
    grid = configs_of(params)
    return grid[0] if len(grid) == 1 else None


class LqLinear(BnbQuantizedLinear):
    """A frozen Linear stored as packed NF-b codes with two-level scales (``plugins/_nfk.py``).

    Buffers: ``qweight`` (uint8, ``bits``-bit codes), ``qscale`` (uint8, ``b0``-bit first-level
    codes), ``scale2`` (second-level scales in the ``b1`` dtype), ``offset`` (fp32).
    """

    quantizer = "lq"
    #: the quantizer parameters a fixed config implies (read by requantizing merges without a plan)
    budget, rank, alloc_iters, fisher, solver = None, 0, 1, "", "auto"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, config: NfConfig,
                 compute_dtype: torch.dtype | None = None):
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, bias, weight.dtype, compute_dtype)
        self.config = config
        state = quantize_flat(weight.detach().reshape(-1), config)
        self.register_buffer("qweight", pack_bits(state.codes, config.bits))
        self.register_buffer("qscale", pack_bits(state.scale_codes, config.b0))
        self.register_buffer("scale2", state.scale2)
        self.register_buffer("offset", state.offset)

    bits = property(lambda self: self.config.bits)
    b0 = property(lambda self: self.config.b0)
    B0 = property(lambda self: self.config.B0)
    b1 = property(lambda self: self.config.b1)
    B1 = property(lambda self: self.config.B1)

    @property
    def num_blocks(self) -> int:
        return -(-self.in_features * self.out_features // self.config.B0)

    def block_scales(self) -> torch.Tensor:
        """The fp32 scale of every first-level block, decoded from both levels."""
        codes = unpack_bits(self.qscale, self.config.b0, self.num_blocks)
        return block_scales(codes, self.scale2, self.offset, self.config)

    def codes(self) -> torch.Tensor:
        """The NF-b index of every weight (flat, row-major)."""
        return unpack_bits(self.qweight, self.config.bits, self.in_features * self.out_features)

    def dequantize(self) -> torch.Tensor:
        """``W = nf_code(bits)[code] * scale[block]`` as ``out x in`` in ``weight_dtype``."""
        flat = dequantize_flat(self.codes(), self.block_scales(), self.config)
        return flat.view(self.out_features, self.in_features).to(self._dtype)

    def extra_repr(self) -> str:
        c = self.config
        return (f"{super().extra_repr()}, bits={c.bits}, b0={c.b0}, B0={c.B0}, b1={c.b1}, B1={c.B1}, "
                f"dtype={str(self._dtype).removeprefix('torch.')}")


def config_error_estimates(weight: torch.Tensor, configs: list[NfConfig], rank: int, iters: int = 1,
                           fisher: torch.Tensor | None = None) -> list[float]:
    """``||W - Q - L1 L2||_F^2`` (Fisher-weighted) per config after ``iters`` LQ iterations at ``rank``."""
    w = weight.float()
    if iters == 1:
        l1, l2 = low_rank(w, rank, fisher_weights(fisher) if fisher is not None else None)
        return config_errors(w - l1 @ l2, configs, fisher)
    return [lq_decompose(w, rank, lambda m, c=c: (fake_quantize(m, c), None), iters, fisher).error
            for c in configs]


def check_feasible(bits: np.ndarray, budget: float) -> float:
    """The smallest achievable average bits/param; a clear error when ``budget`` is below it."""
    minimum = float(bits.min())
    if budget < minimum - 1e-12:
        raise ParamError(f"lq: budget={budget:g} bits/param is infeasible: the minimum achievable with this "
                         f"grid is {minimum:.4f} bits/param (every matrix at its smallest config)", param="budget")
    return minimum


def frontier(row: np.ndarray, bits: np.ndarray) -> list[int]:
    """Configs no cheaper-or-equal config beats, by increasing bits (dropping the rest is exact)."""
    kept, best = [], np.inf
    for c in np.lexsort((row, bits)):  # by bits, then error
        if row[c] < best:
            kept.append(int(c))
            best = row[c]
    return kept


def solve_allocation(errors: np.ndarray, bits: np.ndarray, sizes: np.ndarray, budget: float,
                     solver: str = "auto") -> list[int]:
    """The ILP of the module docstring: ``errors`` is ``modules x configs``, ``bits`` per config,
    ``sizes`` (``n_m``) per module; returns the chosen config index per module."""
    share = sizes / sizes.sum()
    minimum = check_feasible(bits, budget)
    if budget - minimum < BUDGET_TOLERANCE:
        cheapest = np.flatnonzero(bits == minimum)
        return [int(cheapest[np.argmin(row[cheapest])]) for row in errors]
    candidates = [frontier(row, bits) for row in errors]
    if solver == "auto":
        chosen = pareto_solve(errors, bits, share, budget - BUDGET_TOLERANCE, candidates)
        if chosen is not None:
            return chosen
    return milp_solve(errors, bits, share, budget - BUDGET_TOLERANCE, candidates)


def pareto_solve(errors: np.ndarray, bits: np.ndarray, share: np.ndarray, capacity: float,
                 candidates: list[list[int]], max_points: int | None = None) -> list[int] | None:
    """Exact dynamic program over the Pareto front of (bits, error) of the first ``m`` matrices;
    ``None`` when the front outgrows ``max_points`` (large models: use the MILP)."""
    rest = np.concatenate([np.cumsum([share[m] * bits[k[0]] for m, k in enumerate(candidates)][::-1])[::-1][1:],
                           [0.0]])  # the least the matrices after m can take
    used, err = np.zeros(1), np.zeros(1)
    steps = []
    for m, cand in enumerate(candidates):
        s = (used[:, None] + share[m] * bits[cand][None, :]).ravel()
        e = (err[:, None] + errors[m, cand][None, :]).ravel()
        parent = np.repeat(np.arange(len(used)), len(cand))
        choice = np.tile(np.asarray(cand), len(used))
        ok = np.flatnonzero(s <= capacity - rest[m])
        order = ok[np.lexsort((e[ok], s[ok]))]
        e_sorted = e[order]
        keep = order[e_sorted < np.minimum.accumulate(np.concatenate([[np.inf], e_sorted[:-1]]))]
        if len(keep) > (DP_MAX_POINTS if max_points is None else max_points):
            return None
        used, err = s[keep], e[keep]
        steps.append((parent[keep], choice[keep]))
    point = int(np.argmin(err))
    chosen = [0] * len(candidates)
    for m in range(len(candidates) - 1, -1, -1):
        parent, choice = steps[m]
        chosen[m] = int(choice[point])
        point = int(parent[point])
    return chosen


def milp_solve(errors: np.ndarray, bits: np.ndarray, share: np.ndarray, capacity: float,
               candidates: list[list[int]]) -> list[int]:
    """The ILP with ``scipy.optimize.milp`` (HiGHS) over the undominated configs."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_matrix

    var_module = np.concatenate([np.full(len(k), m) for m, k in enumerate(candidates)])
    var_config = np.concatenate([np.asarray(k) for k in candidates])
    cost = errors[var_module, var_config]
    scale = cost.max() if cost.max() > 0 else 1.0
    n_vars = len(cost)
    one_each = csr_matrix((np.ones(n_vars), (var_module, np.arange(n_vars))), shape=(len(share), n_vars))
    storage = (bits[var_config] * share[var_module])[None, :]
    with _quiet_stdout():  # HiGHS prints debug lines from C++ now and then
        res = milp(cost / scale, integrality=np.ones(n_vars), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(storage, -np.inf, capacity)],
                   options={"time_limit": ILP_SECONDS})
    if res.x is None:
        raise AdapterhubError(f"lq: the allocation ILP found no solution ({res.message})")
    chosen = [0] * len(share)
    for v in np.flatnonzero(res.x > 0.5):
        chosen[var_module[v]] = int(var_config[v])
    return chosen


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Send file descriptor 1 to /dev/null (the solver writes there from C++, bypassing sys.stdout)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real stdout
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class LqQuantizer(Quantizer):
    name = "lq"
    Params = LqParams
    summary = ("NF-2/3/4/8 with two-level scales; budget=... picks a config per matrix by an integer "
               "linear program (LQ-LoRA)")
    paper = ("Guo et al., LQ-LoRA: Low-rank plus Quantized Matrix Decomposition for Efficient Language "
             "Model Finetuning, 2023, arXiv 2311.12023")

    def bits_per_param(self, params: LqParams) -> float:
        """``b + b0/B0 + b1/(B0 B1)`` of the config; before allocation, the budget."""
        cfg = fixed_config(params)
        if cfg is None:
            return float(params.budget)
        return cfg.bits_per_param

    def quantize(self, module: nn.Module, params: LqParams) -> LqLinear:
        """Quantize with the config ``params`` fixes (after allocation every module has one); a bare
        budget on a single module allocates for that module alone (unweighted)."""
        weight, bias = linear_weight(module, self.name)
        cfg = fixed_config(params)
        if cfg is None:
            if params.fisher:
                raise ParamError("lq: Fisher-weighted allocation needs module names: plan/apply the spec, "
                                 "or fix bits, b0, B0, b1, B1", param="fisher")
            info = ModuleInfo("module", type(module).__name__, "linear", weight.shape[1], weight.shape[0],
                              0, 0, None, True)
            cfg = NfConfig(**self.allocate(params, [(info, lambda: weight)])["module"])
        return LqLinear(weight, bias, cfg, compute_dtype=compute_dtype_of(params.compute_dtype))

    def allocate(self, params: LqParams, modules: list[tuple[ModuleInfo, Any]]) -> dict[str, dict[str, Any]] | None:
        """Per-matrix ``bits, b0, B0, b1, B1`` under ``budget`` (None without a budget). While a bundle with
        saved quantized bases loads (``plugins/_saved_base.py``), the configs it recorded are returned."""
        if params.budget is None:
            return None
        saved = saved_quant_params([info.name for info, _ in modules])  # loading a bundle with saved bases
        if saved is not None:
            try:
                return {n: NfConfig(**{k: qp[k] for k in ("bits", "b0", "B0", "b1", "B1")}).as_dict()
                        for n, qp in saved.items()}
            except (KeyError, TypeError):
                pass  # the manifest lacks a config: allocate as usual
        configs = configs_of(params)
        bits = np.array([c.bits_per_param for c in configs])
        check_feasible(bits, float(params.budget))
        fisher = FisherFile(params.fisher) if params.fisher else None
        errors, sizes = [], []
        for info, load in modules:
            weight = oriented(load(), info)
            f = fisher.get(info.name, tuple(weight.shape)) if fisher is not None else None
            errors.append(config_error_estimates(weight, configs, params.rank, params.alloc_iters, f))
            sizes.append(weight.numel())
        chosen = solve_allocation(np.array(errors, dtype=np.float64), bits, np.array(sizes, dtype=np.float64),
                                  float(params.budget), params.solver)
        return {info.name: configs[c].as_dict() for (info, _), c in zip(modules, chosen)}


def oriented(weight: torch.Tensor, info: ModuleInfo) -> torch.Tensor:
    """The weight as ``out x in`` (what the planner's weight loaders return; a transposed tensor from a
    third-party loader is turned around, any other shape is an error)."""
    want = (info.out_features, info.in_features)
    if info.out_features is None or tuple(weight.shape) == want:
        return weight
    if tuple(weight.shape) == want[::-1]:
        return weight.t()
    raise AdapterhubError(f"lq: module '{info.name}' has a weight of shape {tuple(weight.shape)}, expected {want}")


@hookimpl
def register_quantizers(register):
    register(LqQuantizer)


@hookimpl
def register_commands(cli):
    cli.add_command(lq_fisher_cmd)
